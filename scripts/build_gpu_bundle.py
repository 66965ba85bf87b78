"""Build ``.gpu_bundle/site.tar.xz``: SGLang 0.5.23 + the cp312 wheels the GPU machine lacks, <= 10 MiB.

    python scripts/build_gpu_bundle.py [--out .gpu_bundle] [--max-mib 11.5] [--wheels DIR]

Run it with the interpreter that has sglang 0.5.23 installed (it reads sglang's files and imports
the server's entry points once to see what SGLang loads eagerly). See ``evict.testing.gpu_bundle``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evict.testing.gpu_bundle import BundleError, build_bundle  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, build the bundle, print its size; exit 1 with the reason when it cannot."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / ".gpu_bundle", help="output directory")
    parser.add_argument("--max-mib", type=float, default=11.5, help="fail when the archive is bigger")
    parser.add_argument(
        "--wheels", type=Path, default=None, help="cp312 wheel directory / cache (default: OUT/wheels)"
    )
    parser.add_argument("--no-download", action="store_true", help="fail instead of pip-downloading wheels")
    parser.add_argument(
        "--sglang-dir", type=Path, default=None, help="sglang package dir (default: installed)"
    )
    parser.add_argument(
        "--probe-python",
        default=sys.executable,
        help="interpreter with sglang for the import probe (default: this one)",
    )
    parser.add_argument("--no-probe", action="store_true", help="static import closure only")
    args = parser.parse_args(argv)
    try:
        report = build_bundle(
            args.out,
            max_mib=args.max_mib,
            wheel_dir=args.wheels,
            download=not args.no_download,
            sglang_dir=args.sglang_dir,
            repo_root=REPO,
            probe_python=None if args.no_probe else args.probe_python,
        )
    except BundleError as exc:
        print(f"build_gpu_bundle: {exc}", file=sys.stderr)
        return 1
    print(
        f"{report.archive} {report.size_mib:.2f} MiB: {report.sglang_files} sglang files "
        f"({report.sglang_modules} modules), {len(report.wheels)} wheels, stubs {', '.join(report.stubs)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
