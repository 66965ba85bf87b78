"""Where the shipped files live, in a checkout and in an installed wheel alike, and where EVICT caches.

A checkout (and an editable install) keeps the cost tables in the repo's ``configs/``; a wheel
carries the same files as ``evict/configs/`` (``pyproject.toml`` maps the package
``evict.configs`` to ``configs/``). Every command that defaults to a shipped file asks here.

Cost tables measured on the user's machine (the reference engine's zero-config measurement and the
SGLang plugin's start-up calibration) are cached under :func:`cache_dir`, so a second run reuses
them instead of measuring again.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "PACKAGE_DIR",
    "TESTBED_COST_TABLE",
    "TESTBED_COST_TABLES",
    "CACHE_DIR_ENV",
    "cache_dir",
    "shipped_config",
]

PACKAGE_DIR = Path(__file__).resolve().parent
TESTBED_COST_TABLE = "testbed_cpu_cost_table.json"  # the shipped testbed pair, profiled on CPU
#: Every shipped CPU table of a testbed pair (``--testbed``); the one made for the loaded model is used.
TESTBED_COST_TABLES = (TESTBED_COST_TABLE, "testbed_moe128_padded_cpu_cost_table.json")
CACHE_DIR_ENV = "EVICT_CACHE_DIR"


def shipped_config(name: str = TESTBED_COST_TABLE) -> Path | None:
    """Path of a shipped ``configs/`` file, or None when this install lacks it.

    The installed package's copy wins: next to an installed package, ``../configs`` would be
    ``site-packages/configs``, which is not ours.
    """
    for folder in (PACKAGE_DIR / "configs", PACKAGE_DIR.parent / "configs"):
        path = folder / name
        if path.is_file():
            return path
    return None


def cache_dir(environ: dict[str, str] | None = None) -> Path:
    """EVICT's cache folder: ``$EVICT_CACHE_DIR``, else ``$XDG_CACHE_HOME/evict``, else ``~/.cache/evict``.

    Measured cost tables belong to the machine, not to the checkout or the install, so they go to
    the user's cache (XDG base-directory spec); ``EVICT_CACHE_DIR`` moves them, e.g. onto a volume
    that survives container restarts. The folder is not created here.
    """
    env = os.environ if environ is None else environ
    override = env.get(CACHE_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    xdg = env.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "evict"
