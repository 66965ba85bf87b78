"""The shipped testbed pairs by name, and the weight-read-bound variant made from one at load time.

Why names: every CPU figure of the project (bench, oracle gap, profiler, served rig) is measured on
a testbed, and the conclusions depend on its cost curve. ``moe32`` (the first pair: 32 experts,
top-4) keeps its experts in cache, so CPU verification is compute-bound and dense-like. ``moe128``
has Qwen3-30B-A3B's routing shape (128 experts, top-8, normalized top-k probabilities).
``moe128-padded`` is ``moe128`` with every expert's intermediate dimension padded with zeros, so
that a token's cost is reading its routed experts' weights, as on a GPU: the function is unchanged
(the padded gate/up rows and down columns are zero), only the bytes read grow.

The padded checkpoint is written once into the cache (:func:`evict.paths.cache_dir`) and reused, so
the reference engine, ``evict-profile`` and SGLang's server all load a plain HF folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "NamedTestbed",
    "TESTBEDS",
    "DEFAULT_TESTBED",
    "PADDED_INTERMEDIATE",
    "testbed_dir",
    "testbed_choices",
    "pad_expert_tensors",
    "materialize_padded",
]

PACKAGE_DIR = Path(__file__).resolve().parent.parent

#: The padded expert width of ``moe128-padded``: the smallest of the widths tried on the 2-core CPU
#: machine at which reading a token's 8 routed experts per layer is most of its step (T(1, 64) /
#: T(1, 1) is then 9.7-11.3x, above the H100's fused-MoE 5.9x; docs/testbed.md, "The padded variant").
PADDED_INTERMEDIATE = 2048


@dataclass(frozen=True)
class NamedTestbed:
    """A named pair: the shipped folder (``evict/<folder>/{target,drafter}``) and an optional padding."""

    name: str
    folder: str
    summary: str
    pad_intermediate: int | None = None


TESTBEDS: dict[str, NamedTestbed] = {
    spec.name: spec
    for spec in (
        NamedTestbed(
            "moe32", "testbed", "first pair: 32 experts top-4, hidden 192, 12 layers (compute-bound)"
        ),
        NamedTestbed(
            "moe128", "testbed_moe128", "Qwen3-30B-A3B routing: 128 experts top-8, hidden 128, 8 layers"
        ),
        NamedTestbed(
            "moe128-padded",
            "testbed_moe128",
            f"moe128, experts zero-padded to intermediate {PADDED_INTERMEDIATE} (weight-read-bound)",
            PADDED_INTERMEDIATE,
        ),
    )
}
DEFAULT_TESTBED = "moe32"


def testbed_choices() -> str:
    """``"moe32 (default), moe128, moe128-padded"``: the names every ``--testbed`` help lists."""
    return ", ".join(f"{n} (default)" if n == DEFAULT_TESTBED else n for n in TESTBEDS)


def testbed_dir(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """A folder with ``target/`` and ``drafter/`` for a testbed name or a folder path.

    ``None`` is the default pair. A padded variant is materialized into the cache on first use
    (about 15 s; 1.6 GB for moe128-padded). Raises ValueError naming the known testbeds for an
    unknown name, FileNotFoundError when a shipped pair's weights are missing.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_TESTBED
    key = str(name_or_path)
    spec = TESTBEDS.get(key)
    if spec is None:
        path = Path(key).expanduser()
        if (path / "target" / "config.json").is_file() and (path / "drafter" / "config.json").is_file():
            return path
        raise ValueError(
            f"testbed {key!r} is neither a known testbed ({', '.join(TESTBEDS)}) nor a folder with "
            "target/config.json and drafter/config.json"
        )
    shipped = PACKAGE_DIR / spec.folder
    for sub in ("target", "drafter"):
        if not any((shipped / sub).glob("*.safetensors")):
            flag = "" if spec.folder == "testbed" else " --preset moe128"
            raise FileNotFoundError(
                f"testbed {spec.name}: weights missing in {shipped / sub}; retrain them with "
                f"`python scripts/train_testbed.py{flag}`"
            )
    if spec.pad_intermediate is None:
        return shipped
    return materialize_padded(shipped, spec.pad_intermediate)


def pad_expert_tensors(
    tensors: dict[str, torch.Tensor], intermediate: int, padded: int
) -> dict[str, torch.Tensor]:
    """Zero-pad every routed expert's intermediate dimension from ``intermediate`` to ``padded``.

    HF Qwen3-MoE names: ``...mlp.experts.{e}.{gate,up}_proj.weight`` are [I, H] (rows padded),
    ``...down_proj.weight`` is [H, I] (columns padded). silu(0) * 0 = 0 and the zero down columns
    add nothing, so the model computes the same function while reading ``padded / intermediate``
    times the expert bytes. Other tensors pass through unchanged.
    """
    if padded < intermediate:
        raise ValueError(f"padded intermediate {padded} is below the model's {intermediate}")
    out: dict[str, torch.Tensor] = {}
    extra = padded - intermediate
    for name, t in tensors.items():
        if ".mlp.experts." in name and name.endswith(("gate_proj.weight", "up_proj.weight")):
            if t.shape[0] != intermediate:
                raise ValueError(f"{name}: {tuple(t.shape)}, expected {intermediate} rows")
            t = torch.cat([t, t.new_zeros(extra, t.shape[1])], dim=0)
        elif ".mlp.experts." in name and name.endswith("down_proj.weight"):
            if t.shape[1] != intermediate:
                raise ValueError(f"{name}: {tuple(t.shape)}, expected {intermediate} columns")
            t = torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)
        out[name] = t.contiguous()
    return out


def _source_key(shipped: Path, padded: int) -> str:
    """Content key of a padded copy: every file of the pair's target/ and drafter/ (both are in the
    copy, so a retrained drafter makes a new one), and the width. Contents, not times: a fresh
    clone of the same pair finds the copy it made before (23 MB hashed in well under a second)."""
    h = hashlib.sha256(f"pad{padded}".encode())
    for sub in ("target", "drafter"):
        for f in sorted((shipped / sub).iterdir()):
            if f.is_file():
                h.update(f"{sub}/{f.name}:".encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def materialize_padded(shipped: Path, padded: int, cache_root: Path | None = None) -> Path:
    """Write (once) ``shipped``'s pair with zero-padded experts; return the folder with target/, drafter/.

    The drafter is copied unchanged (it has no experts). The copy is keyed by the source files and
    ``padded``, written to a temporary sibling and renamed into place, so concurrent or interrupted
    runs never leave a half-written checkout.
    """
    from safetensors.torch import load_file, save_file

    from evict.paths import cache_dir

    src_t = shipped / "target"
    cfg = json.loads((src_t / "config.json").read_text())
    inter = int(cfg["moe_intermediate_size"])
    root = (cache_root or cache_dir()) / "testbeds"
    dest = root / f"{shipped.name}-pad{padded}-{_source_key(shipped, padded)}"
    if (dest / "target" / "config.json").is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "target").mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src_t.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    save_file(
        pad_expert_tensors(tensors, inter, padded),
        str(tmp / "target" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for f in src_t.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy2(f, tmp / "target" / f.name)
    cfg["moe_intermediate_size"] = padded
    cfg["evict_padded_from"] = {"moe_intermediate_size": inter, "source": shipped.name}
    (tmp / "target" / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.copytree(shipped / "drafter", tmp / "drafter")
    try:
        tmp.rename(dest)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
