"""The input boundary shared by EVICT's command-line front ends.

Why one module: ``evict generate``, ``evict-profile`` and ``evict-bench`` all take output paths,
lists of sizes and seeds, and all load a model before doing minutes of work. A bad path found only
after that work (``--out`` naming a directory, a results folder that is a file) costs the whole run,
so every front end checks its paths here *before* anything heavy is imported or loaded, and turns
every expected problem into one line that names it and its fix. Results folders are written as a
unit (:func:`write_folder_atomically`): an interrupted run leaves the previous results intact, and a
new run never mixes its files with an older run's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "BoundaryError",
    "check_output_file",
    "check_output_dir",
    "check_input_file",
    "check_unique",
    "current_umask",
    "write_folder_atomically",
    "run_console",
    "OneLineArgumentParser",
]

EXIT_BAD_INPUT = 2  # argparse's own status for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class BoundaryError(ValueError):
    """A bad argument or file, found before any long work; the message names the problem and the fix."""


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, flag: str) -> None:
    """The folders above ``path`` exist or can be made, and the nearest existing one is writable."""
    anc = _nearest_existing(path.parent)
    if not anc.is_dir():
        raise BoundaryError(f"{flag} {path}: {anc} is a file, not a folder; choose a path under a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise BoundaryError(f"{flag} {path}: cannot write in {anc} (permission denied); choose another path")


def check_output_file(path: Path, flag: str, example: str) -> None:
    """``path`` can be written as a file: not a directory, under a writable folder.

    ``example`` is a file name to suggest when ``path`` is a directory (``--out DIR`` usually means
    "put it in DIR").
    """
    path = Path(path)
    if path.is_dir():
        raise BoundaryError(f"{flag} {path} is a directory; give a file path such as {path / example}")
    if path.exists() and not os.access(path, os.W_OK):
        raise BoundaryError(f"{flag} {path} exists and is read-only; choose another path or make it writable")
    _check_creatable(path, flag)


def check_output_dir(path: Path, flag: str, marker: str) -> None:
    """``path`` can become a results folder: new, empty, or a previous result (holds ``marker``).

    A non-empty folder without ``marker`` is refused rather than replaced: :func:`write_folder_atomically`
    swaps the whole folder, and a user's other files must never be swept away with an old result.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BoundaryError(
            f"{flag} {path} is a file; give a folder (a new one, or a previous results folder)"
        )
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise BoundaryError(
            f"{flag} {path} holds files that are not a previous result (no {marker}); give a new or empty "
            "folder (a results folder is replaced as a whole)"
        )
    _check_creatable(path, flag)
    if path.is_dir() and not os.access(path.parent.absolute(), os.W_OK | os.X_OK):
        raise BoundaryError(f"{flag} {path}: cannot replace it in {path.parent} (permission denied)")


def check_input_file(path: Path, flag: str, what: str, make: str = "") -> None:
    """``path`` is an existing, readable file (a clear line instead of a later traceback).

    ``make`` says how to create one, for the not-found message (e.g. ``evict-profile --out FILE``).
    """
    path = Path(path)
    if not path.exists():
        how = f", or make one with `{make}`" if make else ""
        raise BoundaryError(f"{flag} {path}: file not found; give the path of an existing {what}{how}")
    if path.is_dir():
        raise BoundaryError(f"{flag} {path} is a directory; give the path of a {what} file")
    if not os.access(path, os.R_OK):
        raise BoundaryError(f"{flag} {path}: cannot read it (permission denied)")


def check_unique(values: Sequence[int], flag: str) -> None:
    """Refuse repeated values: ``--seeds 0 0`` would report two repeats of one measurement."""
    seen: set[int] = set()
    dups = sorted({v for v in values if v in seen or seen.add(v)})
    if dups:
        raise BoundaryError(f"{flag} repeats {', '.join(map(str, dups))}; list each value once")


@contextlib.contextmanager
def write_folder_atomically(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to fill; on success it replaces ``final`` as a whole.

    The new folder appears only complete (a rename); a previous ``final`` is moved aside first and
    deleted after, so an interrupt at any point leaves either the old results or the new ones, never
    a mix. On an exception the temporary folder is removed and ``final`` is untouched. The folder
    gets the user's umask (``mkdtemp`` would make it 0700).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:  # put the previous results back
                os.replace(old / final.name, final)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_console(prog: str, main: Callable[[], int], on_interrupt: str = "") -> int:
    """Run a console entry point: Ctrl-C ends with one line and status 130, not a traceback.

    A :class:`BoundaryError` that escapes ``main`` prints ``prog: error: ...`` and returns 2.
    """
    try:
        return main()
    except KeyboardInterrupt:
        tail = f"; {on_interrupt}" if on_interrupt else ""
        print(f"\n{prog}: interrupted{tail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BoundaryError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (problem, then where to look), exit 2.

    argparse prints the whole usage block before the error; in a long command line the one line
    that matters scrolls out of sight, and every other error of these tools is one line.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
