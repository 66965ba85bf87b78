"""Cost profiling for EVICT: the cost-table schema and I/O live in :mod:`evict.profiler.table`.

Kept minimal on purpose: timing backends, expert counting and the CLI import heavy modules and are
imported from their own submodules, not from here.
"""

from .table import SCHEMA_VERSION, CostTable, CostTableError, model_config_hash

__all__ = ["SCHEMA_VERSION", "CostTable", "CostTableError", "model_config_hash"]
