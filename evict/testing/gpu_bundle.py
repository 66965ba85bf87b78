"""Build a small, self-contained ``site`` archive that runs SGLang 0.5.23's server on the GPU machine.

Why this exists: the borrowed GPU machine has torch / triton / transformers but no sglang and no
internet, and each call to it carries the repo's working tree plus at most 64 MiB of extra files;
the tracked tree already takes ~51 MB. So the server's Python side has to travel as one archive of
~10 MiB: SGLang's pure-Python sources (its Rust ``.so`` files are cp311 builds, useless on the
machine's Python 3.12, and SGLang falls back to Python for them), the extracted contents of the
cp312 wheels the machine lacks (xz on extracted files is far smaller than the wheels themselves),
and tiny stubs for heavy optional imports (IPython, soundfile, zstandard) that SGLang imports at
module level but never calls on the text-only serving path.

Which SGLang modules go in is decided by a *static* import closure: every ``import`` statement in a
module, including the ones inside functions and branches (SGLang imports CUDA-only code lazily,
which a CPU import cannot observe), plus string literals naming ``sglang.*`` modules (registries
that ``importlib.import_module`` by name), followed transitively from the server's entry points and
from whatever ``evict`` imports from sglang. Subtrees for other hardware, diffusion, tests and
benchmarks are cut off so that the closure fits the budget. Data files (fused-MoE triton configs,
JIT kernel sources, chat templates) travel with the Python package that owns them.

    python scripts/build_gpu_bundle.py [--out .gpu_bundle] [--max-mib 11.5] [--wheels DIR]

On the GPU machine::

    mkdir -p /tmp/site && tar -xJf .gpu_bundle/site.tar.xz -C /tmp/site
    export PYTHONPATH=/tmp/site:$PYTHONPATH
"""

from __future__ import annotations

import ast
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = [
    "SGLANG_VERSION",
    "FAKE_CUDA_PRELUDE",
    "ENTRY_MODULES",
    "EXCLUDED_PREFIXES",
    "PROBE_MODULES",
    "KEPT_PREFIXES",
    "EXCLUDED_DATA_DIRS",
    "WHEELS",
    "STUBS",
    "BundleError",
    "BundleReport",
    "module_imports",
    "index_package",
    "import_closure",
    "select_package_files",
    "evict_sglang_imports",
    "probe_runtime_modules",
    "read_sglang_version",
    "find_sglang_dir",
    "wheel_file_for",
    "ensure_wheels",
    "extract_wheel",
    "prune_site",
    "write_stubs",
    "evict_plugin_record",
    "write_dist_info",
    "write_dist_infos",
    "build_bundle",
    "tracked_mib",
    "GPU_LEAVE_BEHIND",
    "HIDDEN_DIR",
    "hide_for_device",
    "restore_after_device",
]

SGLANG_VERSION = "0.5.23"

#: Where the server starts, plus the CUDA-path modules named by the EVICT plugin and GPU runs. The
#: static closure follows every import from these, lazy ones included.
ENTRY_MODULES: tuple[str, ...] = (
    "sglang",
    "sglang.launch_server",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.entrypoints.engine",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.managers.data_parallel_controller",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.model_executor.cuda_graph_config",
    "sglang.srt.models.registry",
    "sglang.srt.models.qwen3_moe",
    "sglang.srt.models.qwen2_moe",
    "sglang.srt.models.qwen3",
    "sglang.srt.models.qwen2",
    "sglang.srt.models.llama",
    "sglang.srt.models.llama_eagle3",
    "sglang.srt.layers.attention.attention_registry",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.layers.attention.flashinfer_backend",
    "sglang.srt.layers.attention.torch_native_backend",
    "sglang.srt.layers.moe.fused_moe_triton",
    "sglang.srt.layers.moe.fused_moe_triton.layer",
    "sglang.srt.layers.moe.moe_runner.triton",
    "sglang.srt.layers.sampler",
    "sglang.srt.speculative.spec_registry",
    "sglang.srt.speculative.eagle_worker_v2",
    "sglang.srt.speculative.eagle_utils",
    "sglang.srt.speculative.eagle_info",
    "sglang.srt.speculative.adaptive_runtime_state",
    "sglang.srt.speculative.eagle_draft_cuda_graph_runner",
    "sglang.srt.speculative.eagle_draft_extend_cuda_graph_runner",
    "sglang.srt.speculative.draft_utils",
    "sglang.srt.speculative.spec_utils",
    "sglang.srt.platforms.cuda",
    "sglang.srt.hardware_backend.gpu",
)

#: What the build's import probe imports for real (in sglang's interpreter, on CPU): the entry
#: points plus the EVICT plugin, whose module-level imports are exactly what SGLang loads it with.
PROBE_MODULES: tuple[str, ...] = (
    "sglang.launch_server",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.models.qwen3_moe",
    "sglang.srt.models.llama_eagle3",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.layers.moe.fused_moe_triton.layer",
    "sglang.srt.speculative.eagle_worker_v2",
    "sglang.srt.speculative.eagle_utils",
    "sglang.srt.layers.sampler",
    "evict.plugin",
    "evict.plugin.worker",
    "evict.plugin.spec_algo",
)

#: Module prefixes the closure never enters: other hardware (Ascend, Apple, Intel XPU, Moore
#: Threads), diffusion and multimodal generation, tests, benchmarks, and the rust/gRPC servers
#: (their ``.so`` files are cp311 and not carried). Everything else that the served path can reach,
#: even through an import inside a function, travels: GPU run 2 died in CUDA-graph capture on a
#: lazy import of the DeepSeek-V4 backend (``_forks_draft_metadata_prep``), run 1 on a module-level
#: quantization import. Cutting a prefix only stops the *static* walk: whatever SGLang imports
#: eagerly from there still goes in through the import probe.
EXCLUDED_PREFIXES: tuple[str, ...] = (
    "sglang.multimodal_gen",
    "sglang.test",
    "sglang.benchmark",
    "sglang.bench_serving",
    "sglang.bench_one_batch_server",
    "sglang.compile_deep_gemm",
    "sglang.srt.hardware_backend.npu",
    "sglang.srt.hardware_backend.mlx",
    "sglang.srt.hardware_backend.mps",
    "sglang.srt.hardware_backend.musa",
    "sglang.srt.hardware_backend.xpu",
    "sglang.srt.platforms.npu",
    "sglang.srt.platforms.mps",
    "sglang.srt.platforms.musa",
    "sglang.srt.platforms.xpu",
    "sglang.kernels.ops.diffusion",
    "sglang.kernels.kda_kernels",
    "sglang.srt.rust_server",
    "sglang.srt.rust_extensions._",
    "sglang.srt.mem_cache.rust_tree_core.mem_cache",
)

#: Exceptions to :data:`EXCLUDED_PREFIXES` (same prefix rules).
KEPT_PREFIXES: tuple[str, ...] = (
    # the scheduler imports these inside functions (scripted test runtimes, xgrammar's test hook)
    "sglang.test.scripted_runtime",
    "sglang.test.test_utils",
)

#: Path prefixes (relative to the ``sglang`` package; a trailing ``/`` names a directory) of data
#: files left out although their package is in: JIT CUDA sources and GEMM / LoRA configs for
#: DeepSeek / Kimi / MiniMax / KDA / diffusion / quantized / LoRA paths.
EXCLUDED_DATA_DIRS: tuple[str, ...] = (
    "kernels/jit/csrc/deepseek_v4/",
    "kernels/jit/csrc/deepseek_v32/",
    "kernels/jit/csrc/gemm/",
    "kernels/jit/csrc/deep_select/",
    "kernels/jit/csrc/diffusion/",
    "kernels/jit/csrc/inkling/",
    "kernels/jit/csrc/kimi_k3/",
    "kernels/jit/csrc/muse_spark/",
    "kernels/jit/csrc/minimax/",
    "kernels/jit/csrc/sparse_mla_q8kv8_prefill_sm90/",
    "kernels/jit/csrc/dsa_gfx950/",
    "kernels/jit/csrc/dsa/",
    "kernels/jit/csrc/lora/",
    "kernels/jit/csrc/qprep_bf16_fp8_sm90/",
    "kernels/jit/csrc/minicpm_sala/",
    "kernels/jit/include/sgl_kernel/deepseek_v4/",
    "kernels/jit/include/sgl_kernel/quantization/gguf/",
    "kernels/ops/gemm/configs/",
    "srt/lora/",
    "kernels/ops/lora/",
    "kernels/jit/csrc/attention/kda_",
)

#: Suffixes of non-Python files that travel with their package: triton/MoE tuning configs, chat
#: templates, and the CUDA sources SGLang's JIT kernels compile on the machine.
DATA_SUFFIXES: tuple[str, ...] = (
    ".json",
    ".jinja",
    ".yaml",
    ".yml",
    ".txt",
    ".cuh",
    ".cu",
    ".h",
    ".hpp",
    ".cpp",
    ".cc",
    ".c",
    ".inc",
)

#: The cp312 wheels the GPU machine lacks and SGLang 0.5.23's server imports, at the versions
#: installed beside SGLang here (``pip download`` pins).
WHEELS: tuple[str, ...] = (
    "annotated-types==0.8.0",
    "apache-tvm-ffi==0.1.11",
    "compressed-tensors==0.18.0",
    "dill==0.4.1",
    "distro==1.9.0",
    "fastapi==0.165.0",
    "gguf==0.19.0",
    "interegular==0.3.3",
    "jiter==0.19.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "loguru==0.7.3",
    "msgspec==0.23.0",
    "openai==2.8.0",
    "opentelemetry-api==1.45.2",
    "orjson==3.13.0",
    "partial-json-parser==0.2.1.1.post7",
    "pybase64==1.5.1",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "python-multipart==0.0.34",
    "pyzmq==27.3.0",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "setproctitle==1.3.8",
    "sniffio==1.3.1",
    "starlette==1.10.0",
    "typing-inspection==0.4.5",
    "uvicorn==0.55.0",
    "xgrammar==0.2.7",
)

PIP_PLATFORM_ARGS: tuple[str, ...] = (
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
)

#: Paths (relative to the site root) dropped after the wheels are extracted: build-system sources
#: the runtime never reads. (``tvm_ffi/lib/libtvm_ffi_testing.so`` stays: ``import tvm_ffi`` loads it.)
PRUNED_PATHS: tuple[str, ...] = (
    "tvm_ffi/3rdparty/libbacktrace",
    "tvm_ffi/cython",
    "tvm_ffi/src",
    "tvm_ffi/stub",
    "bin",
)

_STUB_HEADER = (
    '"""EVICT GPU-bundle stub: SGLang imports this module at module level on paths the text server\n'
    "never calls. Calling anything here raises; install the real package to use it.\n"
    '"""\n\n__evict_stub__ = True\n\n\n'
    "def _unavailable(*args, **kwargs):\n"
    '    raise ImportError(f"{__name__} is an EVICT GPU-bundle stub; install the real package")\n\n\n'
)

#: Stub modules written at the site root. They shadow nothing on the GPU machine (none of these
#: is installed there) and each carries ``__evict_stub__ = True``.
STUBS: dict[str, str] = {
    "IPython/__init__.py": _STUB_HEADER,
    "IPython/display.py": _STUB_HEADER
    + "class HTML:\n    def __init__(self, *args, **kwargs):\n        self.data = args[0] if args else None\n\n\n"
    "def display(*args, **kwargs):\n    return None\n",
    "soundfile.py": _STUB_HEADER + "read = write = info = _unavailable\n\n\n"
    "class SoundFile:\n    def __init__(self, *args, **kwargs):\n        _unavailable()\n",
    "zstandard.py": _STUB_HEADER + "class ZstdError(Exception):\n    pass\n\n\n"
    "class ZstdDecompressor:\n    def __init__(self, *args, **kwargs):\n        _unavailable()\n",
}

MANIFEST_NAME = "evict_gpu_bundle_manifest.json"
ARCHIVE_NAME = "site.tar.xz"
# The device call carries 64 MiB with the checkout; ~52 MB of it are tracked files today.
CARRY_LIMIT_MIB = 64.0
DEFAULT_MAX_MIB = 11.5

_SGLANG_LITERAL = re.compile(r"^sglang(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class BundleError(RuntimeError):
    """The bundle cannot be built as asked (wrong sglang, missing wheels, over the size limit)."""


def module_imports(source: str, module: str, is_package: bool = False, strings: bool = True) -> set[str]:
    """Every module name ``source`` may import, wherever the import sits (functions and branches too).

    Why all of them: SGLang imports CUDA-only code inside functions, which a CPU import never runs.
    ``from X import Y`` yields both ``X`` and ``X.Y`` (Y may be a submodule; the caller keeps only
    names that exist), relative imports are resolved against ``module``, and string constants that
    spell ``sglang.<...>`` count too (registries import them by name) unless ``strings`` is false.
    """
    tree = ast.parse(source)
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(package_parts) - (node.level - 1)
                if keep <= 0:
                    continue
                base_parts = package_parts[:keep]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base:
                continue
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
            # "sglang.x.y" and registry targets "sglang.x.y:attr" (kernel registries import by name)
            name = node.value.split(":", 1)[0]
            if _SGLANG_LITERAL.match(name):
                found.add(name)
    return found


def index_package(root: Path, package: str = "sglang") -> dict[str, Path]:
    """Map each module of the package rooted at ``root`` (the package directory) to its ``.py`` file.

    Directories without ``__init__.py`` count as namespace packages (SGLang's ``sglang/srt`` is
    one); ``__pycache__`` and paths that are not identifiers are skipped.
    """
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts:
            continue
        parts = [*rel.parts[:-1]] + ([] if path.stem == "__init__" else [path.stem])
        if not all(part.isidentifier() for part in parts):
            continue
        index[".".join([package, *parts])] = path
    return index


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    """Prefix match on dotted names; a prefix ending in ``_`` also matches mid-component."""
    return any(name == p or name.startswith(p if p.endswith("_") else p + ".") for p in prefixes)


def _excluded(name: str, excluded: Sequence[str], kept: Sequence[str] = ()) -> bool:
    return _matches(name, excluded) and not _matches(name, kept)


def import_closure(
    index: Mapping[str, Path],
    entries: Iterable[str],
    excluded: Sequence[str] = EXCLUDED_PREFIXES,
    imports_of: Mapping[str, set[str]] | None = None,
    kept: Sequence[str] = KEPT_PREFIXES,
) -> set[str]:
    """The modules of ``index`` reachable from ``entries`` through static imports, minus ``excluded``.

    Why parents too: importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``, so every
    included module pulls in its enclosing packages. ``imports_of`` (module -> names) replaces
    parsing, for tests and for callers that already parsed the tree.
    """
    cache: dict[str, set[str]] = dict(imports_of or {})

    def imports(name: str) -> set[str]:
        if name not in cache:
            path = index[name]
            cache[name] = module_imports(
                path.read_text(encoding="utf-8"), name, is_package=path.name == "__init__.py"
            )
        return cache[name]

    seen: set[str] = set()
    todo = [e for e in entries if e in index and not _excluded(e, excluded, kept)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        targets = {".".join(parts[:i]) for i in range(1, len(parts))}
        for imported in imports(name):
            # ``from a.b import c`` where c is a function: fall back to the longest existing prefix.
            cur = imported
            while cur and cur not in index:
                cur = cur.rpartition(".")[0]
            if cur:
                targets.add(cur)
        todo.extend(t for t in targets if t in index and t not in seen and not _excluded(t, excluded, kept))
    return seen


def select_package_files(
    root: Path,
    modules: Iterable[str],
    index: Mapping[str, Path],
    data_suffixes: Sequence[str] = DATA_SUFFIXES,
    excluded_data_dirs: Sequence[str] = EXCLUDED_DATA_DIRS,
) -> list[Path]:
    """Files (relative to ``root``'s parent) to ship: the modules' ``.py`` files plus data files.

    A data file goes in when the nearest directory above it that holds Python code also holds an
    included module (so ``moe_runner/triton_utils/configs/triton_3_6_0/*.json`` follows
    ``moe_runner.triton_utils``, ``kernels/jit/csrc/**`` follows ``kernels.jit``); compiled
    extensions, ``__pycache__`` and ``excluded_data_dirs`` (relative to ``root``) never do.
    """
    chosen = set(modules)
    files = {index[m].relative_to(root.parent) for m in chosen}
    module_dirs = {index[m].parent for m in chosen}
    has_code: dict[Path, bool] = {}

    def holds_code(directory: Path) -> bool:
        if directory not in has_code:
            has_code[directory] = any(directory.glob("*.py"))
        return has_code[directory]

    for path in root.rglob("*"):
        if path.suffix == ".py" or path.suffix.lower() not in data_suffixes or "__pycache__" in path.parts:
            continue
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if any(rel.startswith(d) for d in excluded_data_dirs):
            continue
        owner = path.parent
        while owner != root and not holds_code(owner):
            owner = owner.parent
        if owner in module_dirs:
            files.add(path.relative_to(root.parent))
    return sorted(files)


def evict_sglang_imports(evict_dir: Path) -> set[str]:
    """The ``sglang.*`` module names the ``evict`` package imports anywhere (lazy imports included).

    Import statements only: evict's strings that name sglang modules (this module's own tables,
    the shim's patch targets) are not imports.
    """
    names: set[str] = set()
    for path in evict_dir.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        try:
            found = module_imports(path.read_text(encoding="utf-8"), "evict._scan", strings=False)
        except SyntaxError:
            continue
        names.update(n for n in found if n == "sglang" or n.startswith("sglang."))
    return names


#: Torch made to report one H200 (no GPU needed), so SGLang takes its ``if _is_cuda:`` branches at
#: import. The bundle's probe runs it before importing; tests run it before a dry GPU launch.
FAKE_CUDA_PRELUDE = """
import torch


class _Props:
    name, major, minor, multi_processor_count = "NVIDIA H200", 9, 0, 132
    total_memory, L2_cache_size, warp_size = 143771 * 2**20, 60 * 2**20, 32


torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.get_device_name = lambda *a, **k: "NVIDIA H200"
torch.cuda.get_device_properties = lambda *a, **k: _Props()
torch.cuda.mem_get_info = lambda *a, **k: (140 * 2**30, 143771 * 2**20)
"""

_PROBE_SCRIPT = """
import importlib, json, os, sys
if os.environ.get("EVICT_PROBE_FAKE_CUDA") == "1":
    exec(os.environ["EVICT_PROBE_PRELUDE"])  # FAKE_CUDA_PRELUDE: take SGLang's CUDA branches
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - report, never abort the probe
        failed[name] = repr(exc)[:300]
mods = sorted(m for m in list(sys.modules) if m == "sglang" or m.startswith("sglang."))
print("@@PROBE@@" + json.dumps({"modules": mods, "failed": failed}))
"""


def probe_runtime_modules(
    python: str,
    entries: Sequence[str],
    repo_root: Path | None = None,
    timeout: float = 600.0,
    fake_cuda: bool = False,
) -> tuple[set[str], dict[str, str]]:
    """Import ``entries`` in a fresh ``python`` and return the ``sglang.*`` modules it loaded.

    Why on top of the static closure: SGLang imports some modules eagerly from code the closure
    cuts off (e.g. NPU / XPU graph runners pulled in at module level by the model runner); the
    probe sees those, the static closure sees the lazy CUDA-only ones. ``fake_cuda`` makes torch
    report an H200 and puts the ``sgl_kernel`` stand-in first, so the module-level ``if _is_cuda:``
    imports are taken as on the GPU machine (the first GPU run died on one the CPU probe missed:
    ``quantization/marlin_utils.py`` -> ``kernels.ops.gemm.gptq_marlin``). Returns (modules, failures).
    """
    env = dict(os.environ)
    if repo_root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    if fake_cuda:
        # the GPU machine's view: CUDA present, sgl_kernel only as EVICT's stand-in package
        shim = Path(__file__).resolve().parent / "cuda_shim"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
        env.update(
            EVICT_PROBE_FAKE_CUDA="1",
            EVICT_PROBE_PRELUDE=FAKE_CUDA_PRELUDE,
            EVICT_CUDA_SHIM="1",
            SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK="1",
        )
    result = subprocess.run(
        [python, "-c", _PROBE_SCRIPT, *entries],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=str(repo_root) if repo_root else None,
    )
    for line in result.stdout.splitlines():
        if line.startswith("@@PROBE@@"):
            data = json.loads(line[len("@@PROBE@@") :])
            return set(data["modules"]), dict(data["failed"])
    raise BundleError(f"import probe with {python} failed (rc {result.returncode}):\n{result.stderr[-3000:]}")


def read_sglang_version(sglang_dir: Path) -> str:
    """The version recorded in ``sglang/_version.py`` (read, not imported: importing sglang is slow)."""
    path = sglang_dir / "_version.py"
    if not path.is_file():
        raise BundleError(f"{sglang_dir} has no _version.py; is it an installed sglang package?")
    match = re.search(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", path.read_text(), re.M)
    if match is None:
        raise BundleError(f"cannot read a version from {path}")
    return match.group(1)


def find_sglang_dir() -> Path:
    """The installed ``sglang`` package directory of this interpreter, without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(
            f"sglang is not installed for {sys.executable}; run with sglang's interpreter "
            f"(e.g. a virtual environment with the sglang extra) or pass --sglang-dir"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_file_for(requirement: str, wheel_dir: Path) -> Path | None:
    """The wheel in ``wheel_dir`` that satisfies the pin ``name==version``, if any."""
    name, _, version = requirement.partition("==")
    want = (_normalize(name), version)
    for path in sorted(wheel_dir.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 2 and (_normalize(parts[0]), parts[1]) == want:
            return path
    return None


def ensure_wheels(
    wheel_dir: Path, requirements: Sequence[str] = WHEELS, download: bool = True
) -> dict[str, Path]:
    """Return the wheel for every pin, running ``pip download`` (cp312 manylinux) for missing ones.

    Why download by default: a fresh checkout has no wheel cache; ``--wheels DIR`` points at one
    (a local wheel cache) and ``download=False`` turns a gap into an error instead of a fetch.
    """
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [r for r in requirements if wheel_file_for(r, wheel_dir) is None]
    if missing and download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *PIP_PLATFORM_ARGS]
        cmd += ["--dest", str(wheel_dir), *missing]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BundleError(f"pip download failed for {missing}:\n{result.stderr[-3000:]}")
        missing = [r for r in requirements if wheel_file_for(r, wheel_dir) is None]
    if missing:
        raise BundleError(
            f"wheels missing from {wheel_dir}: {', '.join(missing)} "
            "(drop --no-download, or fill the directory with pip download)"
        )
    return {r: wheel_file_for(r, wheel_dir) for r in requirements}  # type: ignore[misc]


def extract_wheel(wheel: Path, site: Path) -> None:
    """Unpack ``wheel`` into ``site`` as ``pip install --target`` would (``*.data`` lib dirs merged).

    Scripts and headers under ``*.data`` are dropped: nothing on the machine runs them.
    """
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = PurePosixPath(info.filename).parts
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            if ".." in parts:
                raise BundleError(f"{wheel.name}: unsafe path {info.filename}")
            target = site.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode | 0o600)


def prune_site(site: Path, pruned: Sequence[str] = PRUNED_PATHS) -> None:
    """Drop ``pruned`` paths and ``__pycache__`` dirs from ``site``.

    dist-info ``RECORD`` files stay: ``tvm_ffi.libinfo.load_lib_module`` finds xgrammar's and its
    own shared libraries through them.
    """
    for rel in pruned:
        target = site / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)


def write_stubs(site: Path, stubs: Mapping[str, str] = STUBS) -> list[str]:
    """Write the stub modules into ``site``; refuse to overwrite a real module from a wheel."""
    written = []
    for rel, text in stubs.items():
        target = site / rel
        if target.exists():
            raise BundleError(f"stub {rel} would overwrite a real module in the bundle")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(rel)
    return written


def evict_plugin_record(repo_root: Path) -> tuple[str, str | None]:
    """``evict``'s version and its ``entry_points.txt`` text, read from ``pyproject.toml``."""
    pyproject = (repo_root / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M)
    plugin = re.search(
        r'\[project\.entry-points\."sglang\.srt\.plugins"\]\s*\n\s*evict\s*=\s*"([^"]+)"', pyproject
    )
    entry_points = f"[sglang.srt.plugins]\nevict = {plugin.group(1)}\n" if plugin else None
    return (match.group(1) if match else "0.0.0"), entry_points


def write_dist_info(site: Path, name: str, version: str, entry_points: str | None = None) -> Path:
    """A minimal ``NAME-VERSION.dist-info`` in ``site``: what ``importlib.metadata`` needs to find
    a distribution (and its entry points) on ``sys.path`` without an install."""
    dist = site / f"{name}-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist / "INSTALLER").write_text("evict-gpu-bundle\n")
    if entry_points:
        (dist / "entry_points.txt").write_text(entry_points)
    return dist


def write_dist_infos(site: Path, sglang_version: str, repo_root: Path) -> list[str]:
    """Write minimal ``sglang`` and ``evict`` dist-info directories into ``site``.

    Why: SGLang discovers plugins through ``importlib.metadata`` entry points (group
    ``sglang.srt.plugins``), and the GPU machine has the repo on ``PYTHONPATH`` but no installed
    ``evict``; the ``evict`` dist-info makes ``evict.plugin:register`` discoverable there (it only
    registers the EVICT algorithm name and a resolution hook). The ``sglang`` one answers
    ``importlib.metadata.version("sglang")``.
    """
    evict_version, entry_points = evict_plugin_record(repo_root)
    return [
        write_dist_info(site, "sglang", sglang_version).name,
        write_dist_info(site, "evict", evict_version, entry_points).name,
    ]


@dataclass
class BundleReport:
    """What a build produced: where, how big, and what went in."""

    archive: Path
    size_bytes: int
    sglang_modules: int
    sglang_files: int
    wheels: list[str] = field(default_factory=list)
    stubs: list[str] = field(default_factory=list)
    top_level: list[str] = field(default_factory=list)

    @property
    def size_mib(self) -> float:
        return self.size_bytes / 2**20


def _member_order(path: Path) -> tuple[str, str, str]:
    """Group members by kind (``.so`` together, ``.py`` together, ...): xz finds more repeats."""
    kind = ".so" if ".so" in path.name.split(".", 1)[-1].split(".") else path.suffix
    return (kind, str(path.parent), path.name)


def _tar_xz(site: Path, archive: Path, preset: int) -> None:
    """Write ``site``'s contents to ``archive`` deterministically (fixed order, owner and mtime).

    The x86 BCJ filter before LZMA2 shrinks the shared libraries by ~5% of the whole archive;
    ``tar -xJf`` (xz) and Python's ``tarfile`` both decode it.
    """
    paths = sorted((Path(d, f) for d, _, names in os.walk(site) for f in names), key=_member_order)
    tmp = archive.with_suffix(".tmp")
    filters = [
        {"id": lzma.FILTER_X86},
        {"id": lzma.FILTER_LZMA2, "preset": preset | lzma.PRESET_EXTREME, "dict_size": 64 << 20},
    ]
    with lzma.open(tmp, "wb", format=lzma.FORMAT_XZ, filters=filters) as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in paths:
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(site)))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    tmp.replace(archive)


#: Tracked folders the GPU check does not need and leaves behind (``scripts/gpu_carry.py hide``):
#: the 128-expert testbed's weights (22 MB) would push checkout + bundle past the carry limit.
GPU_LEAVE_BEHIND: tuple[str, ...] = ("evict/testbed_moe128",)
#: Where ``hide`` parks them: ignored by git (``/.gpu_hidden/``) and never named in ``carry``.
HIDDEN_DIR = ".gpu_hidden"


def tracked_mib(repo_root: Path, leave_behind: Sequence[str] = ()) -> float:
    """Size of the files git tracks, less ``leave_behind`` folders: what a device call carries before
    the bundle."""
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, check=True
    ).stdout.decode()
    prefixes = tuple(p.rstrip("/") + "/" for p in leave_behind)
    total = sum(
        (repo_root / name).stat().st_size
        for name in out.split("\0")
        if name and not name.startswith(prefixes) and (repo_root / name).is_file()
    )
    return total / 2**20


def hide_for_device(repo_root: Path, paths: Sequence[str] = GPU_LEAVE_BEHIND) -> list[str]:
    """Take ``paths`` out of what a device call sends: untrack them (index only) and park the files
    in ``HIDDEN_DIR``. Why not just delete: the call sends tracked and untracked-not-ignored files,
    so a folder must be neither; ``restore_after_device`` puts both back. Returns the paths moved."""
    moved = []
    for rel in paths:
        src, dst = repo_root / rel, repo_root / HIDDEN_DIR / rel
        if not src.exists():
            continue
        if dst.exists():
            raise BundleError(f"{dst} exists: run `python scripts/gpu_carry.py restore` first")
        subprocess.run(["git", "rm", "-r", "-q", "--cached", "--", rel], cwd=repo_root, check=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        moved.append(rel)
    return moved


def restore_after_device(repo_root: Path, paths: Sequence[str] = GPU_LEAVE_BEHIND) -> list[str]:
    """Undo ``hide_for_device``: move the parked files back and re-track them as committed."""
    restored = []
    for rel in paths:
        src, dst = repo_root / HIDDEN_DIR / rel, repo_root / rel
        if not src.exists():
            continue
        if dst.exists():
            raise BundleError(f"both {src} and {dst} exist; keep one by hand")
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        subprocess.run(["git", "reset", "-q", "--", rel], cwd=repo_root, check=True)
        restored.append(rel)
    return restored


def build_bundle(
    out_dir: Path,
    *,
    max_mib: float = DEFAULT_MAX_MIB,
    wheel_dir: Path | None = None,
    download: bool = True,
    sglang_dir: Path | None = None,
    repo_root: Path | None = None,
    entries: Sequence[str] | None = None,
    extra_entries: Sequence[str] = (),
    requirements: Sequence[str] = WHEELS,
    probe_python: str | None = None,
    preset: int = 9,
    log: Callable[[str], None] = print,
) -> BundleReport:
    """Build ``out_dir/site.tar.xz``; raise :class:`BundleError` if it cannot, or if it is too big.

    Steps: check sglang is 0.5.23, compute the static import closure (plus, with ``probe_python``,
    the modules a real import of the entry points loads there), copy its files, extract the
    wheels, prune, add stubs and a manifest, then tar + xz. The archive is written first and
    removed again when it exceeds ``max_mib``, so an oversize bundle never reaches the machine.
    """
    sglang_dir = (sglang_dir or find_sglang_dir()).resolve()
    version = read_sglang_version(sglang_dir)
    if version != SGLANG_VERSION:
        raise BundleError(f"sglang at {sglang_dir} is {version}; the bundle needs {SGLANG_VERSION}")
    repo_root = repo_root or Path(__file__).resolve().parents[2]
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel_dir = wheel_dir or out_dir / "wheels"
    wheels = ensure_wheels(wheel_dir, requirements, download=download)

    index = index_package(sglang_dir)
    base = ENTRY_MODULES if entries is None else entries
    entries = [*base, *sorted(evict_sglang_imports(repo_root / "evict")), *extra_entries]
    modules = import_closure(index, entries)
    probe_failed: dict[str, str] = {}
    if probe_python:
        probed, probe_failed = probe_runtime_modules(
            probe_python, [*PROBE_MODULES, *extra_entries], repo_root=repo_root
        )
        cuda_probed, cuda_failed = probe_runtime_modules(
            probe_python, [*PROBE_MODULES, *extra_entries], repo_root=repo_root, fake_cuda=True
        )
        probed |= cuda_probed
        probe_failed.update({f"{k} (fake CUDA)": v for k, v in cuda_failed.items()})
        extra = {m for m in probed if m in index} - modules
        log(f"import probe: {len(probed)} sglang modules loaded, {len(extra)} beyond the static closure")
        for name, err in sorted(probe_failed.items()):
            log(f"import probe: {name} failed: {err}")
        modules |= extra
    files = select_package_files(sglang_dir, modules, index)
    log(f"sglang {version}: {len(modules)} modules, {len(files)} files from {sglang_dir}")

    with tempfile.TemporaryDirectory(prefix="evict-gpu-bundle-") as tmp:
        site = Path(tmp) / "site"
        for rel in files:
            target = site / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sglang_dir.parent / rel, target)
        for wheel in wheels.values():
            extract_wheel(wheel, site)
        prune_site(site)
        stubs = write_stubs(site)
        dist_infos = write_dist_infos(site, version, repo_root)
        top_level = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info"))
        manifest = {
            "sglang_version": version,
            "sglang_modules": sorted(modules),
            "wheels": sorted(w.name for w in wheels.values()),
            "stubs": stubs,
            "dist_infos": dist_infos,
            "excluded_prefixes": list(EXCLUDED_PREFIXES),
            "probe_failed": probe_failed,
            "usage": "mkdir -p /tmp/site && tar -xJf site.tar.xz -C /tmp/site && "
            "export PYTHONPATH=/tmp/site:$PYTHONPATH",
        }
        (site / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        archive = out_dir / ARCHIVE_NAME
        _tar_xz(site, archive, preset)

    size = archive.stat().st_size
    report = BundleReport(
        archive=archive,
        size_bytes=size,
        sglang_modules=len(modules),
        sglang_files=len(files),
        wheels=sorted(w.name for w in wheels.values()),
        stubs=stubs,
        top_level=top_level,
    )
    if report.size_mib > max_mib:
        archive.unlink()
        raise BundleError(
            f"{ARCHIVE_NAME} is {report.size_mib:.2f} MiB, over the {max_mib} MiB limit "
            f"(the GPU call carries {CARRY_LIMIT_MIB:.0f} MiB with the checkout); trim EXCLUDED_PREFIXES or WHEELS"
        )
    log(f"wrote {archive}: {report.size_mib:.2f} MiB")
    return report


def list_archive(archive: Path) -> list[str]:
    """Member names of a built archive (for checks; reads the whole xz stream)."""
    with tarfile.open(archive, "r:xz") as tar:
        return tar.getnames()
