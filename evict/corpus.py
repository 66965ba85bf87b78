"""The testbed's text corpus: the Python standard library's own source, split by file.

Every machine has it, so the testbed pair can be retrained anywhere without downloads. Training
(`scripts/train_testbed.py`), the profiler's realistic inputs and the benchmark's prompts must all
use the *same* held-out split, or the benchmark would measure text the models were trained on; this
module is that one split.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

__all__ = ["HOLDOUT_EVERY", "corpus_split", "heldout_files", "read_source", "stdlib_root"]

HOLDOUT_EVERY = 20  # every 20th file (sorted order) is held out from training


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=4)
def _source_files(root: str) -> tuple[Path, ...]:
    """Sorted ``*.py`` files under root, without site-packages and __pycache__ (cached: a slow walk)."""
    files = tuple(
        sorted(
            p
            for p in Path(root).rglob("*.py")
            if "site-packages" not in p.parts and "__pycache__" not in p.parts and p.is_file()
        )
    )
    if not files:
        raise RuntimeError(f"no *.py files under {root}: the corpus needs the Python standard library source")
    return files


def corpus_split(
    holdout_every: int = HOLDOUT_EVERY, root: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """(train, held-out) source files: file i is held out when ``i % holdout_every == holdout_every - 1``."""
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be >= 2, got {holdout_every}")
    files = _source_files(str(stdlib_root() if root is None else Path(root)))
    train = [f for i, f in enumerate(files) if i % holdout_every != holdout_every - 1]
    held = [f for i, f in enumerate(files) if i % holdout_every == holdout_every - 1]
    return train, held


def heldout_files(holdout_every: int = HOLDOUT_EVERY, root: Path | None = None) -> list[Path]:
    """The held-out files of :func:`corpus_split` (never seen by the shipped pair)."""
    return corpus_split(holdout_every, root)[1]


def read_source(path: Path) -> str:
    """A source file as UTF-8, undecodable bytes replaced (a few stdlib test files are latin-1)."""
    return Path(path).read_text(encoding="utf-8", errors="replace")
