"""The GPU bundle (``evict.testing.gpu_bundle``): closure and selection on a fake tree, then a real build.

The fast tests build a fake ``sglang`` package and a fake wheel in ``tmp_path``: no sglang, no
network. The ``sglang`` ones read the installed SGLang 0.5.23; the slow one builds the real
archive (about a minute) from a wheel directory (``EVICT_GPU_WHEELS``, else
``pip download``, which needs the network) and checks its size and listing. With
``EVICT_BUNDLE_PYTHON`` set to a Python 3.12 *without* sglang (torch, transformers, ... as on the
GPU machine), it also extracts the archive and imports the server's modules from it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from evict.testing import gpu_bundle as gb

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fake_sglang(root: Path, version: str = gb.SGLANG_VERSION) -> Path:
    """A tiny sglang: a namespace ``srt``, a lazy import, a string-named module, data, junk."""
    pkg = root / "sglang"
    _write(pkg / "__init__.py", "from sglang.version import __version__\n")
    _write(pkg / "version.py", "from sglang._version import __version__\n")
    _write(pkg / "_version.py", f"__version__ = version = '{version}'\n")
    _write(pkg / "launch_server.py", "from sglang.srt import server_args\n")
    # srt is a namespace package (no __init__.py), as in SGLang 0.5.23
    _write(
        pkg / "srt" / "server_args.py",
        "import os\n\ndef pick():\n    from .layers.moe import runner\n    return 'sglang.srt.models.qwen'\n",
    )
    _write(pkg / "srt" / "layers" / "__init__.py")
    _write(pkg / "srt" / "layers" / "moe" / "__init__.py")
    _write(
        pkg / "srt" / "layers" / "moe" / "runner.py", "from ..quant import fp8\nfrom . import helper as h\n"
    )
    _write(pkg / "srt" / "layers" / "moe" / "helper.py")
    _write(pkg / "srt" / "layers" / "moe" / "configs" / "triton_3_6_0" / "E=128,N=768.json", "{}")
    _write(pkg / "srt" / "layers" / "moe" / "configs" / "notes.md", "not data")
    _write(pkg / "srt" / "layers" / "moe" / "fast.cpython-311-x86_64-linux-gnu.so", "ELF")
    _write(pkg / "srt" / "layers" / "moe" / "__pycache__" / "runner.cpython-311.pyc", "pyc")
    _write(pkg / "srt" / "layers" / "quant" / "fp8.py", "import sglang.srt.layers.quant.int4\n")
    _write(pkg / "srt" / "layers" / "quant" / "int4.py")
    _write(pkg / "srt" / "layers" / "unused.py")
    _write(pkg / "srt" / "layers" / "unused_data" / "big.json", "{}")
    _write(pkg / "srt" / "models" / "qwen.py", "from sglang.srt.models import deepseek\n")
    _write(pkg / "srt" / "models" / "deepseek.py")
    _write(pkg / "kernels" / "jit" / "__init__.py")
    _write(pkg / "kernels" / "jit" / "csrc" / "moe" / "a.cuh", "// moe")
    _write(pkg / "kernels" / "jit" / "csrc" / "skipme" / "b.cuh", "// skipped")
    _write(pkg / "test" / "test_x.py")
    _write(pkg / "srt" / "server_args_lazy.py", "import sglang.kernels.jit\nimport sglang.test.test_x\n")
    return pkg


def _fake_wheel(directory: Path, name: str = "tinydep", version: str = "1.0") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        zf.writestr(f"{name}-{version}.data/purelib/{name}_extra.py", "X = 1\n")
        zf.writestr(f"{name}-{version}.data/scripts/{name}-cli", "#!/bin/sh\n")
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
        zf.writestr(f"{name}-{version}.dist-info/RECORD", "")
    return wheel


# --- pure logic ---------------------------------------------------------------------------------


def test_module_imports_sees_lazy_relative_from_and_string_named_modules():
    source = (
        "import a.b, c\n"
        "from .sib import f\n"
        "from ..up import g as h\n"
        "from . import mod\n"
        "def lazy():\n"
        "    if x:\n"
        "        from sglang.srt.deep import k\n"
        "    return 'sglang.srt.models.qwen3', 'not.a module', 'sglang'\n"
        "TARGET = 'sglang.kernels.ops.moe.moe_topk_softmax:topk_softmax'\n"
    )
    found = gb.module_imports(source, "sglang.srt.pkg.m")
    assert {
        "a.b",
        "c",
        "sglang.srt.pkg.sib",
        "sglang.srt.pkg.sib.f",
        "sglang.srt.up",
        "sglang.srt.up.g",
    } <= found
    assert {"sglang.srt.pkg", "sglang.srt.pkg.mod", "sglang.srt.deep.k", "sglang.srt.models.qwen3"} <= found
    assert "sglang.kernels.ops.moe.moe_topk_softmax" in found  # a kernel registry's "module:attr"
    assert "sglang" not in found and "not.a module" not in found
    assert "sglang.srt.models.qwen3" not in gb.module_imports(source, "sglang.srt.pkg.m", strings=False)
    # in a package's __init__, "." is the package itself
    assert "sglang.srt.pkg.sib" in gb.module_imports(
        "from .sib import f\n", "sglang.srt.pkg", is_package=True
    )


def test_index_treats_directories_without_init_as_namespace_packages(tmp_path):
    pkg = _fake_sglang(tmp_path)
    index = gb.index_package(pkg)
    assert index["sglang"] == pkg / "__init__.py"
    assert index["sglang.srt.server_args"] == pkg / "srt" / "server_args.py"
    assert index["sglang.srt.layers.moe"] == pkg / "srt" / "layers" / "moe" / "__init__.py"
    assert "sglang.srt" not in index  # a namespace package has no file
    assert not any("__pycache__" in str(p) for p in index.values())


def test_closure_follows_lazy_and_string_imports_and_stops_at_excluded_prefixes(tmp_path):
    index = gb.index_package(_fake_sglang(tmp_path))
    closure = gb.import_closure(
        index,
        ["sglang.launch_server", "sglang.srt.server_args_lazy"],
        excluded=("sglang.test", "sglang.srt.models"),
        kept=("sglang.srt.models.qwen",),
    )
    assert {
        "sglang",  # parent of every module, and its own imports
        "sglang.version",
        "sglang._version",
        "sglang.launch_server",
        "sglang.srt.server_args",
        "sglang.srt.layers",
        "sglang.srt.layers.moe",
        "sglang.srt.layers.moe.runner",  # imported inside a function, relatively
        "sglang.srt.layers.moe.helper",  # ``from . import helper``
        "sglang.srt.layers.quant.fp8",
        "sglang.srt.layers.quant.int4",  # transitively
        "sglang.srt.models.qwen",  # named by a string, excluded prefix but kept
        "sglang.kernels.jit",
    } <= closure
    assert "sglang.srt.models.deepseek" not in closure  # excluded, not kept
    assert "sglang.test.test_x" not in closure
    assert "sglang.srt.layers.unused" not in closure


def test_closure_honours_precomputed_imports_and_mid_name_prefixes():
    index = {n: Path(f"/x/{n}.py") for n in ("sglang", "sglang.a", "sglang.a_b", "sglang.ab")}
    imports = {
        "sglang": set(),
        "sglang.a": {"sglang.a_b", "sglang.ab.func"},
        "sglang.a_b": set(),
        "sglang.ab": set(),
    }
    closure = gb.import_closure(index, ["sglang.a"], excluded=("sglang.a_",), imports_of=imports, kept=())
    assert closure == {"sglang", "sglang.a", "sglang.ab"}  # ``sglang.ab.func`` falls back to sglang.ab


def test_selection_ships_owned_data_and_never_binaries_or_caches(tmp_path):
    pkg = _fake_sglang(tmp_path)
    index = gb.index_package(pkg)
    closure = gb.import_closure(index, ["sglang.launch_server", "sglang.srt.server_args_lazy"], excluded=())
    files = {
        p.as_posix()
        for p in gb.select_package_files(
            pkg, closure, index, excluded_data_dirs=("kernels/jit/csrc/skipme/",)
        )
    }
    assert "sglang/srt/layers/moe/configs/triton_3_6_0/E=128,N=768.json" in files
    assert "sglang/kernels/jit/csrc/moe/a.cuh" in files
    assert "sglang/kernels/jit/csrc/skipme/b.cuh" not in files
    assert not any(f.endswith((".so", ".pyc", ".md")) for f in files)
    assert all((tmp_path / f).is_file() for f in files)


def test_selection_data_follows_nearest_code_directory(tmp_path):
    # unused_data's nearest code dir is srt/layers, whose __init__ is in the closure only if imported
    pkg = _fake_sglang(tmp_path)
    index = gb.index_package(pkg)
    files = {p.as_posix() for p in gb.select_package_files(pkg, {"sglang", "sglang.srt.layers"}, index)}
    assert "sglang/srt/layers/unused_data/big.json" in files
    assert "sglang/srt/layers/moe/configs/triton_3_6_0/E=128,N=768.json" not in files


def test_evict_imports_are_scanned_from_the_repo():
    names = gb.evict_sglang_imports(ROOT / "evict")
    assert "sglang.srt.speculative.eagle_worker_v2" in names
    assert all(n == "sglang" or n.startswith("sglang.") for n in names)
    assert not any(n.startswith("sglang.test") for n in names)  # gpu_bundle's own tables are not imports


def test_version_is_read_without_importing(tmp_path):
    assert gb.read_sglang_version(_fake_sglang(tmp_path)) == gb.SGLANG_VERSION
    with pytest.raises(gb.BundleError, match="_version.py"):
        gb.read_sglang_version(tmp_path)


def test_build_refuses_another_sglang_version(tmp_path):
    pkg = _fake_sglang(tmp_path / "src", version="0.5.22")
    with pytest.raises(gb.BundleError, match=r"0\.5\.22.*needs 0\.5\.23"):
        gb.build_bundle(
            tmp_path / "out", sglang_dir=pkg, wheel_dir=tmp_path / "w", download=False, log=lambda _: None
        )


def test_missing_wheels_fail_with_their_names(tmp_path):
    _fake_wheel(tmp_path, "tinydep", "1.0")
    assert gb.wheel_file_for("tinydep==1.0", tmp_path) is not None
    assert gb.wheel_file_for("TinyDep==1.0", tmp_path) is not None  # names are normalized
    assert gb.wheel_file_for("tinydep==2.0", tmp_path) is None
    with pytest.raises(gb.BundleError, match="other-pkg==3"):
        gb.ensure_wheels(tmp_path, ["tinydep==1.0", "other-pkg==3"], download=False)


def test_wheel_extraction_merges_lib_data_and_drops_scripts(tmp_path):
    site = tmp_path / "site"
    gb.extract_wheel(_fake_wheel(tmp_path / "w"), site)
    assert (site / "tinydep" / "__init__.py").is_file()
    assert (site / "tinydep_extra.py").is_file()
    assert (site / "tinydep-1.0.dist-info" / "RECORD").is_file()  # tvm_ffi finds libraries through it
    assert not list(site.rglob("tinydep-cli"))


def test_stubs_import_and_refuse_to_shadow_real_modules(tmp_path):
    site = tmp_path / "site"
    assert sorted(gb.write_stubs(site)) == sorted(gb.STUBS)
    code = (
        "import IPython, soundfile, zstandard\n"
        "from IPython.display import HTML, display\n"
        "assert IPython.__evict_stub__ and soundfile.__evict_stub__ and zstandard.__evict_stub__\n"
        "display(HTML('<b>x</b>'))\n"
        "try:\n    zstandard.ZstdDecompressor()\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit(1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(site)})
    with pytest.raises(gb.BundleError, match="overwrite"):
        gb.write_stubs(site)


def test_dist_infos_make_the_plugin_discoverable(tmp_path):
    gb.write_dist_infos(tmp_path, gb.SGLANG_VERSION, ROOT)
    dists = {d.metadata["Name"]: d for d in importlib.metadata.distributions(path=[str(tmp_path)])}
    assert dists["sglang"].version == gb.SGLANG_VERSION
    eps = [ep for ep in dists["evict"].entry_points if ep.group == "sglang.srt.plugins"]
    assert [(ep.name, ep.value) for ep in eps] == [("evict", "evict.plugin:register")]


def test_fake_build_end_to_end_and_size_limit(tmp_path):
    pkg = _fake_sglang(tmp_path / "src")
    _fake_wheel(tmp_path / "wheels")
    kwargs = dict(
        sglang_dir=pkg,
        wheel_dir=tmp_path / "wheels",
        download=False,
        entries=["sglang.launch_server"],
        requirements=["tinydep==1.0"],
        repo_root=ROOT,
        preset=1,
        log=lambda _: None,
    )
    report = gb.build_bundle(tmp_path / "out", **kwargs)
    names = set(gb.list_archive(report.archive))
    assert {"sglang/launch_server.py", "sglang/srt/server_args.py", "tinydep/__init__.py"} <= names
    assert {"IPython/display.py", "soundfile.py", "zstandard.py", gb.MANIFEST_NAME} <= names
    assert "evict-0.1.0.dist-info/entry_points.txt" in names
    assert not any(n.endswith(".so") or "__pycache__" in n for n in names)
    with tarfile.open(report.archive, "r:xz") as tar:
        manifest = json.load(tar.extractfile(gb.MANIFEST_NAME))
    assert manifest["sglang_version"] == gb.SGLANG_VERSION
    assert "sglang.srt.server_args" in manifest["sglang_modules"]
    with pytest.raises(gb.BundleError, match="over the 1e-05 MiB limit"):
        gb.build_bundle(tmp_path / "out", max_mib=1e-5, **kwargs)
    assert not report.archive.exists()  # an oversize archive is removed


def test_cli_reports_errors_without_a_traceback(tmp_path):
    pkg = _fake_sglang(tmp_path / "src", version="0.4.0")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_gpu_bundle.py"), "--out", str(tmp_path / "o")]
        + ["--sglang-dir", str(pkg), "--no-probe", "--no-download"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "build_gpu_bundle: " in result.stderr and "Traceback" not in result.stderr


# --- against the installed SGLang 0.5.23 --------------------------------------------------------


def _sglang_dir() -> Path:
    pytest.importorskip("sglang")
    path = gb.find_sglang_dir()
    if gb.read_sglang_version(path) != gb.SGLANG_VERSION:
        pytest.skip(f"needs sglang {gb.SGLANG_VERSION}")
    return path


@pytest.mark.sglang
def test_real_closure_holds_the_served_path_and_its_configs():
    root = _sglang_dir()
    index = gb.index_package(root)
    closure = gb.import_closure(index, [*gb.ENTRY_MODULES, *gb.evict_sglang_imports(ROOT / "evict")])
    for name in (
        "sglang.srt.entrypoints.http_server",
        "sglang.srt.managers.scheduler",
        "sglang.srt.model_executor.model_runner",
        "sglang.srt.models.qwen3_moe",
        "sglang.srt.models.llama_eagle3",
        "sglang.srt.layers.attention.triton_backend",
        "sglang.srt.layers.moe.fused_moe_triton.layer",
        "sglang.srt.speculative.eagle_worker_v2",
        "sglang.srt.speculative.adaptive_runtime_state",
        "sglang.srt.layers.sampler",
        *gb.evict_sglang_imports(ROOT / "evict") & set(index),
    ):
        assert name in closure, name
    assert not any(gb._excluded(m, gb.EXCLUDED_PREFIXES, gb.KEPT_PREFIXES) for m in closure)
    files = {p.as_posix() for p in gb.select_package_files(root, closure, index)}
    h200 = "sglang/srt/layers/moe/moe_runner/triton_utils/configs/triton_3_6_0/E=128,N=768,device_name=NVIDIA_H200.json"
    assert h200 in files
    # SGLang falls back to Python when its Rust extensions are absent: nothing compiled ships
    assert not any(f.endswith(".so") for f in files)


def _wheel_dir(tmp_path: Path) -> Path:
    candidate = os.environ.get("EVICT_GPU_WHEELS")
    if candidate and Path(candidate).is_dir():
        return Path(candidate)
    return tmp_path / "wheels"  # empty: the build downloads (network)


@pytest.mark.slow
@pytest.mark.sglang
def test_real_bundle_fits_and_lists_what_the_server_needs(tmp_path):
    root = _sglang_dir()
    report = gb.build_bundle(
        tmp_path / "out",
        wheel_dir=_wheel_dir(tmp_path),
        sglang_dir=root,
        repo_root=ROOT,
        probe_python=sys.executable,
        log=lambda _: None,
    )
    assert report.size_mib <= gb.DEFAULT_MAX_MIB
    # checkout + bundle must fit the device call's carry limit, with room for the untracked rest
    # (the folders the GPU check leaves behind, scripts/gpu_carry.py hide, do not travel)
    assert gb.tracked_mib(ROOT, gb.GPU_LEAVE_BEHIND) + report.size_mib <= gb.CARRY_LIMIT_MIB - 1.0
    names = set(gb.list_archive(report.archive))
    for required in (
        "sglang/launch_server.py",
        "sglang/srt/entrypoints/http_server.py",
        "sglang/srt/models/qwen3_moe.py",
        "sglang/srt/models/llama_eagle3.py",
        "sglang/srt/layers/moe/moe_runner/triton_utils/configs/triton_3_6_0/E=128,N=768,device_name=NVIDIA_H200.json",
        "fastapi/__init__.py",
        "uvicorn/__init__.py",
        "zmq/__init__.py",
        "xgrammar/libxgrammar_bindings.so",
        "tvm_ffi/lib/libtvm_ffi_testing.so",
        "IPython/display.py",
        gb.MANIFEST_NAME,
    ):
        assert required in names, required
    assert any(n.startswith("pydantic_core/_pydantic_core.cpython-312") for n in names)
    sglang_names = [n for n in names if n.startswith("sglang/")]
    assert not any(n.endswith(".so") or "__pycache__" in n for n in sglang_names)
    # no module of an excluded subtree, but the test modules the scheduler imports (KEPT_PREFIXES,
    # with the data files they read, e.g. sglang/test/long_prompt.txt)
    kept = tuple(p.replace(".", "/") for p in gb.KEPT_PREFIXES)
    stray = [
        n
        for n in names
        if n.startswith(("sglang/multimodal_gen/", "sglang/test/", "sglang/benchmark/"))
        and n.endswith(".py")
        and not n.startswith(kept)
    ]
    assert not stray, stray[:5]
    assert not any(n.startswith(("sglang/multimodal_gen/", "sglang/benchmark/")) for n in names)
    assert any(n.startswith(kept) for n in names)  # and the kept ones are in

    python = os.environ.get("EVICT_BUNDLE_PYTHON")
    if not python:
        return
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run(["tar", "-xJf", str(report.archive), "-C", str(site)], check=True)
    modules = [
        "sglang.launch_server",
        "sglang.srt.entrypoints.http_server",
        "sglang.srt.managers.scheduler",
        "sglang.srt.model_executor.model_runner",
        "sglang.srt.models.qwen3_moe",
        "sglang.srt.models.llama_eagle3",
        "sglang.srt.layers.attention.triton_backend",
        "sglang.srt.layers.moe.fused_moe_triton.layer",
        "sglang.srt.speculative.eagle_worker_v2",
        "sglang.srt.layers.sampler",
        "evict.plugin.worker",
    ]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    result = subprocess.run(
        [python, "-c", code, *modules], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.sglang
def test_the_fake_cuda_probe_takes_sglangs_cuda_only_imports():
    """GPU run 1 died on ``marlin_utils`` -> ``kernels.ops.gemm.gptq_marlin``, imported at module
    level on CUDA only: a CPU probe never sees it, the fake-CUDA probe must."""
    pytest.importorskip("sglang")
    entry = ["sglang.srt.layers.quantization.marlin_utils"]
    plain, _ = gb.probe_runtime_modules(sys.executable, entry, repo_root=ROOT)
    cuda, failed = gb.probe_runtime_modules(sys.executable, entry, repo_root=ROOT, fake_cuda=True)
    assert "sglang.kernels.ops.gemm.gptq_marlin" not in plain
    assert "sglang.kernels.ops.gemm.gptq_marlin" in cuda and not failed


def test_hide_for_device_takes_a_folder_out_of_what_travels_and_restore_puts_it_back(tmp_path):
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / ".gitignore").write_text(f"/{gb.HIDDEN_DIR}/\n")
    (tmp_path / "keep.txt").write_bytes(b"k" * 1024)
    big = tmp_path / "models" / "big"
    big.mkdir(parents=True)
    (big / "w.bin").write_bytes(b"w" * 2**20)
    git("add", "-A")
    git("commit", "-q", "-m", "x")
    before = gb.tracked_mib(tmp_path)
    assert before > 1.0
    assert gb.tracked_mib(tmp_path, ["models/big"]) < 0.01

    assert gb.hide_for_device(tmp_path, ["models/big"]) == ["models/big"]
    assert not big.exists()
    # neither tracked nor an untracked-not-ignored file: nothing of it travels
    assert "models/big" not in git("ls-files")
    assert git("ls-files", "--others", "--exclude-standard") == ""
    assert gb.tracked_mib(tmp_path) < 0.01
    with pytest.raises(gb.BundleError):  # hiding twice would overwrite the parked copy
        big.mkdir(parents=True)
        try:
            gb.hide_for_device(tmp_path, ["models/big"])
        finally:
            big.rmdir()

    assert gb.restore_after_device(tmp_path, ["models/big"]) == ["models/big"]
    assert (big / "w.bin").stat().st_size == 2**20
    assert git("status", "--porcelain") == ""
    assert gb.tracked_mib(tmp_path) == pytest.approx(before)
