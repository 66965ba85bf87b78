"""Launch SGLang 0.5.23's real server on CPU with the pure-torch operator stand-ins.

    python -m evict.testing.cpu_server [sglang.launch_server arguments ...]

Why a launcher: three things must be in place before SGLang imports anything, in the launcher and
in every process it spawns, and only the environment reaches all of them:

* ``SGLANG_USE_CPU_ENGINE=1`` selects SGLang's CPU platform;
* ``PYTHONPATH`` starts with ``evict/testing/shim``, whose ``common_ops.py`` answers sgl_kernel's
  last-resort ``import common_ops`` with ``evict.testing.cpu_ops`` and whose ``sitecustomize.py``
  keeps ``--attention-backend intel_amx`` from being swapped for ``torch_native`` (which has no
  multi-step draft backend) on CPUs without AMX;
* ``TORCHDYNAMO_DISABLE=1`` (unless already set): same output, starts about 5 s sooner;
* ``CPU_SERVER_SAMPLING_VERIFY=1`` (unless already set; ``0`` restores SGLang's CPU behaviour):
  sampled requests are verified by SGLang's tree rejection sampling (a torch port of the CUDA
  kernel), as on a GPU, instead of greedily as SGLang does on CPU.

The CPU flags ``--device cpu --attention-backend intel_amx --disable-cuda-graph
--max-total-tokens 65536 --dtype float32`` are added unless the arguments already set them, and
``--model-path`` defaults to the shipped testbed target. Everything else (``--port``,
``--speculative-algorithm EAGLE3|EVICT``, ...) passes through unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "SHIM_DIR",
    "CPU_FLAGS",
    "TESTBED_TARGET",
    "TESTBED_DRAFTER",
    "EAGLE3_FLAGS",
    "eagle3_flags",
    "cpu_env",
    "server_command",
    "main",
]

SHIM_DIR = Path(__file__).resolve().parent / "shim"
TESTBED_TARGET = Path(__file__).resolve().parents[1] / "testbed" / "target"
TESTBED_DRAFTER = Path(__file__).resolve().parents[1] / "testbed" / "drafter"

# flag -> value (None = a switch); added only when the caller did not pass the flag
CPU_FLAGS: dict[str, str | None] = {
    "--device": "cpu",
    "--attention-backend": "intel_amx",
    "--disable-cuda-graph": None,
    "--max-total-tokens": "65536",
    # bf16 matmuls have no fast path on CPUs without AMX/AVX512-BF16: decoding is ~5x slower
    "--dtype": "float32",
}


def eagle3_flags(drafter: str | os.PathLike[str] = TESTBED_DRAFTER) -> tuple[str, ...]:
    """The rig's EAGLE-3 flags for ``drafter``: the tree the issue's trial served (3 steps x top-4,
    8 verified tokens), the same for every testbed pair so served figures compare."""
    return (
        "--speculative-draft-model-path",
        str(drafter),
        "--speculative-num-steps",
        "3",
        "--speculative-eagle-topk",
        "4",
        "--speculative-num-draft-tokens",
        "8",
    )


EAGLE3_FLAGS: tuple[str, ...] = eagle3_flags()


def cpu_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the server: ``base`` (default ``os.environ``) plus the CPU settings."""
    env = dict(os.environ if base is None else base)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env.setdefault("CPU_SERVER_SAMPLING_VERIFY", "1")
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SHIM_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM_DIR), *parts])
    return env


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def server_command(
    args: Sequence[str], python: str | None = None, flags: Mapping[str, str | None] = CPU_FLAGS
) -> list[str]:
    """``python -m sglang.launch_server`` with ``args`` plus the ``flags`` (default: the CPU ones)
    the caller left out, and the shipped testbed target unless a model is given."""
    argv = list(args)
    if not _has_flag(argv, "--model-path") and not _has_flag(argv, "--model"):
        argv = ["--model-path", str(TESTBED_TARGET), *argv]
    for flag, value in flags.items():
        if not _has_flag(argv, flag):
            argv += [flag] if value is None else [flag, value]
    return [python or sys.executable, "-m", "sglang.launch_server", *argv]


def main(argv: Sequence[str] | None = None) -> None:
    """Replace this process with the server (signals and exit status are the server's own)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help") and len(args) == 1:
        print(__doc__)
        return
    cmd = server_command(args)
    os.execvpe(cmd[0], cmd, cpu_env())


if __name__ == "__main__":
    main()
