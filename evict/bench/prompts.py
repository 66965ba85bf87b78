"""The benchmark's prompt set: held-out standard-library code and docstring prose.

Why two domains: acceptance (and so the best tree width) depends on how predictable the text is.
Code continuations are repetitive and easy for the drafter; docstring prose is harder. A method
that adapts the width per step should win on the mix, and a static tree tuned for one domain
should not.

The held-out split is the testbed training script's (``scripts/train_testbed.py``,
``corpus_files``): the sorted ``*.py`` files of the running Python's standard library
(``site-packages`` and ``__pycache__`` excluded), every ``holdout_every``-th file held out (index
``i % holdout_every == holdout_every - 1``). Prompts only come from held-out files, so the target
and drafter never saw them. The standard library differs between Python versions, so the report
records the version; within one version the set is deterministic.
"""

from __future__ import annotations

import ast
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evict.corpus import heldout_files, read_source, stdlib_root

__all__ = [
    "Prompt",
    "heldout_files",
    "build_prompts",
    "build_ood_prompts",
    "ood_files",
    "DOMAINS",
    "OOD_PACKAGES",
]

DOMAINS = ("code", "prose")

# Out-of-domain text: installed third-party packages (the testbed was trained on the standard
# library only).  Those present are used, in this order; the set is deterministic per environment.
OOD_PACKAGES = ("numpy", "transformers", "torch", "jinja2", "yaml", "requests", "packaging", "setuptools")


@dataclass(frozen=True)
class Prompt:
    """One prompt: its domain, where it came from (relative to the stdlib root) and its token ids."""

    domain: str
    source: str
    ids: tuple[int, ...]


def _code_text(src: str) -> str | None:
    """A code window: from the first top-level ``def``/``class`` after the first third of the file."""
    lines = src.splitlines(keepends=True)
    if len(lines) < 30:
        return None
    start = len(lines) // 3
    for i in range(start, len(lines)):
        if lines[i].startswith(("def ", "class ", "    def ")):
            return "".join(lines[i:])
    return "".join(lines[start:])


def _docstrings(src: str) -> list[str]:
    """Docstrings of the module, its classes and functions, longest first (prose for prompts)."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            d = ast.get_docstring(node, clean=True)
            if d:
                out.append(d)
    return sorted(out, key=len, reverse=True)


def build_prompts(
    tokenizer: Any,
    num_per_domain: int,
    prompt_tokens: int = 64,
    holdout_every: int = 20,
    root: Path | None = None,
    skip: int = 0,
) -> list[Prompt]:
    """``2 * num_per_domain`` prompts of exactly ``prompt_tokens`` tokens, domains alternating.

    ``tokenizer`` is the target's HF tokenizer (``encode`` without special tokens). Files are taken
    in order (each file gives at most one prompt per domain), spread over the held-out list so the
    prompts cover many modules. ``skip`` drops the first ``skip`` usable prompts of each domain (a
    disjoint calibration set for the static-tree sweep).
    """
    if num_per_domain < 1 or prompt_tokens < 1:
        raise ValueError(
            f"need num_per_domain >= 1 and prompt_tokens >= 1, got {num_per_domain}, {prompt_tokens}"
        )
    files = heldout_files(holdout_every, root)
    base = stdlib_root() if root is None else Path(root)
    return _collect(tokenizer, files, base, num_per_domain, prompt_tokens, skip, "", "held-out files")


def ood_files(packages: tuple[str, ...] = OOD_PACKAGES, root: Path | None = None) -> tuple[list[Path], Path]:
    """Sorted ``*.py`` files of the installed ``packages`` (tests and ``__pycache__`` excluded), and their root."""
    base = Path(sysconfig.get_paths()["purelib"]) if root is None else Path(root)
    files: list[Path] = []
    for name in packages:
        pkg = base / name
        if pkg.is_dir():
            files += sorted(
                p
                for p in pkg.rglob("*.py")
                if "__pycache__" not in p.parts and "tests" not in p.parts and p.is_file()
            )
    return files, base


def build_ood_prompts(
    tokenizer: Any,
    num_per_domain: int,
    prompt_tokens: int = 64,
    packages: tuple[str, ...] = OOD_PACKAGES,
    root: Path | None = None,
) -> list[Prompt]:
    """Like :func:`build_prompts`, from installed third-party packages: domains ``code-ood``, ``prose-ood``.

    Why: the held-out stdlib split is still the training distribution's style; a server meets text
    the drafter never saw, where its probabilities are miscalibrated differently.
    """
    files, base = ood_files(packages, root)
    if not files:
        raise RuntimeError(f"none of the packages {packages} is installed: no out-of-domain prompts")
    return _collect(tokenizer, files, base, num_per_domain, prompt_tokens, 0, "-ood", "third-party files")


def _collect(
    tokenizer: Any,
    files: list[Path],
    base: Path,
    num_per_domain: int,
    prompt_tokens: int,
    skip: int,
    suffix: str,
    where: str,
) -> list[Prompt]:
    """Prompts of both domains from ``files``, domains alternating (see :func:`build_prompts`)."""
    # visit files in a spread-out order (stride through the list) so prompts come from many packages
    stride = 7 if len(files) % 7 else 5
    order = sorted(range(len(files)), key=lambda i: ((i * stride) % len(files), i))
    found: dict[str, list[Prompt]] = {d: [] for d in DOMAINS}
    need = num_per_domain + skip

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    for i in order:
        if all(len(v) >= need for v in found.values()):
            break
        f = files[i]
        src = read_source(f)
        rel = str(f.relative_to(base)) if f.is_relative_to(base) else f.name
        if len(found["code"]) < need:
            text = _code_text(src)
            if text:
                ids = encode(text[: prompt_tokens * 12])
                if len(ids) >= prompt_tokens:
                    found["code"].append(Prompt("code" + suffix, rel, tuple(ids[:prompt_tokens])))
        if len(found["prose"]) < need:
            for d in _docstrings(src)[:1]:
                ids = encode(d[: prompt_tokens * 12])
                if len(ids) >= prompt_tokens:
                    found["prose"].append(Prompt("prose" + suffix, rel, tuple(ids[:prompt_tokens])))
    for d, v in found.items():
        if len(v) < need:
            raise RuntimeError(
                f"only {len(v)} {d} prompts of {prompt_tokens} tokens in the {where}, need {need}: "
                "lower --num-prompts or --prompt-tokens"
            )
    code, prose = found["code"][skip:need], found["prose"][skip:need]
    out: list[Prompt] = []
    for c, p in zip(code, prose):
        out.extend([c, p])
    return out
