"""Where the shipped files live, in a checkout and in an installed wheel alike.

A checkout (and an editable install) keeps the cost tables in the repo's ``configs/``; a wheel
carries the same files as ``evict/configs/`` (``pyproject.toml`` maps the package
``evict.configs`` to ``configs/``). Every command that defaults to a shipped file asks here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PACKAGE_DIR", "TESTBED_COST_TABLE", "shipped_config"]

PACKAGE_DIR = Path(__file__).resolve().parent
TESTBED_COST_TABLE = "testbed_cpu_cost_table.json"  # the shipped testbed pair, profiled on CPU


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
