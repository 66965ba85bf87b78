"""Launch SGLang 0.5.23's real server on a CUDA GPU that has no sgl_kernel, flashinfer or sglang install.

    python -m evict.testing.gpu_server [sglang.launch_server arguments ...]

Why: the GPU machines this project borrows have torch, Triton and nvcc but none of SGLang's compiled
packages, and nothing can be downloaded there. SGLang's Python code travels as a bundle
(``scripts/build_gpu_bundle.py``, unpacked to ``EVICT_GPU_SITE``, default ``/tmp/site``) and the
compiled operators it calls on the CUDA path are replaced by ``evict.testing.cuda_ops`` (pure torch
or SGLang's own Triton kernels). As for the CPU rig (``evict.testing.cpu_server``), what must be in
place before SGLang imports anything has to reach the launcher and every process it spawns, so it
travels in the environment:

* ``PYTHONPATH`` = ``evict/testing/cuda_shim`` (the ``sgl_kernel`` stand-in package and a
  ``sitecustomize`` that patches SGLang at import), then the bundle, then the checkout (``evict``);
* ``EVICT_CUDA_SHIM=1`` switches the ``sitecustomize`` patches on;
* ``SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1``: the stand-in has no version to check;
* an ``evict`` distribution record (``evict-*.dist-info`` with the ``sglang.srt.plugins`` entry
  point) is written next to the bundle when the checkout is not pip-installed, because SGLang
  finds plugins through package metadata, not through ``sys.path``.

The flags ``--attention-backend triton --sampling-backend pytorch --disable-prefill-cuda-graph
--grammar-backend none`` are added unless the arguments set them (FlashInfer and FA3 are compiled
packages; the prefill graph path needs more stand-ins than it is worth). ``--model-path``
defaults to the shipped testbed target. Everything else passes through unchanged.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from evict.testing.cpu_server import TESTBED_DRAFTER, TESTBED_TARGET, server_command

__all__ = [
    "CUDA_SHIM_DIR",
    "GPU_FLAGS",
    "REPO_ROOT",
    "TESTBED_DRAFTER",
    "TESTBED_TARGET",
    "default_site",
    "ensure_entry_point",
    "gpu_env",
    "gpu_server_command",
    "main",
]

CUDA_SHIM_DIR = Path(__file__).resolve().parent / "cuda_shim"
REPO_ROOT = Path(__file__).resolve().parents[2]

# flag -> value (None = a switch); added only when the caller did not pass the flag
GPU_FLAGS: dict[str, str | None] = {
    "--attention-backend": "triton",
    "--sampling-backend": "pytorch",
    "--disable-prefill-cuda-graph": None,
    "--grammar-backend": "none",
}


def default_site() -> Path:
    """Where the unpacked bundle lives (``EVICT_GPU_SITE``, default ``/tmp/site``)."""
    return Path(os.environ.get("EVICT_GPU_SITE", "/tmp/site"))


def _evict_plugin_registered() -> bool:
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    return any(ep.value.startswith("evict.plugin") for ep in eps)


def ensure_entry_point(site: Path) -> Path | None:
    """Write an ``evict`` dist-info (entry point from pyproject.toml) into ``site``, unless an
    installed ``evict`` already registers the plugin.

    Returns the record's directory, or None when nothing had to be written.
    """
    if _evict_plugin_registered():
        return None
    from evict.testing.gpu_bundle import evict_plugin_record, write_dist_info

    version, entry_points = evict_plugin_record(REPO_ROOT)
    return write_dist_info(site, "evict", version, entry_points)


def gpu_env(base: Mapping[str, str] | None = None, site: Path | None = None) -> dict[str, str]:
    """The server's environment: ``base`` (default ``os.environ``) plus the shim, bundle and flags."""
    env = dict(os.environ if base is None else base)
    site = default_site() if site is None else site
    env["EVICT_CUDA_SHIM"] = "1"
    env["SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    front = [str(CUDA_SHIM_DIR), str(site), str(REPO_ROOT)]
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in front]
    env["PYTHONPATH"] = os.pathsep.join([*front, *rest])
    return env


def gpu_server_command(args: Sequence[str], python: str | None = None) -> list[str]:
    """``python -m sglang.launch_server`` with ``args`` plus the GPU flags the caller left out."""
    return server_command(args, python, flags=GPU_FLAGS)


def main(argv: Sequence[str] | None = None) -> None:
    """Replace this process with the server (signals and exit status are the server's own)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help") and len(args) == 1:
        print(__doc__)
        return
    site = default_site()
    if not (site / "sglang").is_dir():
        try:
            import sglang  # noqa: F401  (an installed SGLang serves as well as the bundle)
        except ImportError:
            sys.exit(
                f"evict.testing.gpu_server: no SGLang bundle at {site} and no installed sglang; build one "
                "with `python scripts/build_gpu_bundle.py` and unpack .gpu_bundle/site.tar.xz there "
                "(or set EVICT_GPU_SITE)"
            )
    ensure_entry_point(site)
    cmd = gpu_server_command(args)
    os.execvpe(cmd[0], cmd, gpu_env(site=site))


if __name__ == "__main__":
    main()
