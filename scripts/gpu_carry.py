"""Leave the tracked folders the GPU check does not need out of a device call, and put them back.

    python scripts/gpu_carry.py hide      # before run(command="bash scripts/gpu_check.sh", ...)
    python scripts/gpu_carry.py restore   # after the last device call
    python scripts/gpu_carry.py size      # MiB that a call carries now, with and without the bundle

Why: a device call carries the checkout (tracked and untracked-not-ignored files) plus the carried
bundle, 64 MiB in all; the 128-expert testbed's weights would push it over. ``hide`` untracks them
in the index and parks them in ``.gpu_hidden/`` (ignored); ``restore`` moves them back and re-tracks
them as committed, so ``git status`` is clean again. See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evict.testing.gpu_bundle import (  # noqa: E402
    CARRY_LIMIT_MIB,
    GPU_LEAVE_BEHIND,
    BundleError,
    hide_for_device,
    restore_after_device,
    tracked_mib,
)


def main(argv: list[str] | None = None) -> int:
    """hide / restore / size; exit 1 with the reason when a move would overwrite something."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["hide", "restore", "size"])
    args = p.parse_args(argv)
    try:
        if args.action == "hide":
            print("left behind:", ", ".join(hide_for_device(REPO)) or "nothing (already hidden)")
        elif args.action == "restore":
            print("restored:", ", ".join(restore_after_device(REPO)) or "nothing (nothing hidden)")
    except BundleError as exc:
        print(f"gpu_carry: {exc}", file=sys.stderr)
        return 1
    bundle = REPO / ".gpu_bundle" / "site.tar.xz"
    bundle_mib = bundle.stat().st_size / 2**20 if bundle.is_file() else 0.0
    now = tracked_mib(REPO)
    print(
        f"tracked now {now:.1f} MiB (+ bundle {bundle_mib:.1f} = {now + bundle_mib:.1f} of {CARRY_LIMIT_MIB:.0f}); "
        f"with {', '.join(GPU_LEAVE_BEHIND)} hidden: {tracked_mib(REPO, GPU_LEAVE_BEHIND) + bundle_mib:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
