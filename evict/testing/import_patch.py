"""Patch SGLang modules right after they execute: the one import hook both shims install.

Why a hook and not a monkeypatch after ``import sglang``: SGLang spawns its scheduler and
detokenizer as fresh processes, where only ``sitecustomize`` runs before SGLang's own imports, and
many of its modules bind a function at import time (``from x import f``), so a patch must land the
moment the defining module has executed, before anyone copies the name. The CPU rig
(``evict/testing/shim``) and the CUDA stand-ins (``evict/testing/cuda_shim``) each give
:func:`install` their ``{module name: patch(module)}`` table.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["PatchingFinder", "install"]

Patch = Callable[[ModuleType], None]


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, patch: Patch) -> None:
        self._inner = inner
        self._patch = patch

    def create_module(self, spec):  # noqa: ANN001, ANN201 - importlib's protocol
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._patch(module)


class PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the normal loader of each module named in ``patches``."""

    def __init__(self, patches: Mapping[str, Patch]) -> None:
        self.patches = dict(patches)

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def install(patches: Mapping[str, Patch]) -> PatchingFinder:
    """Put a finder for ``patches`` first on ``sys.meta_path`` (once per table: idempotent)."""
    for finder in sys.meta_path:
        if isinstance(finder, PatchingFinder) and finder.patches == dict(patches):
            return finder
    finder = PatchingFinder(patches)
    sys.meta_path.insert(0, finder)
    return finder
