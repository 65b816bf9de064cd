"""``secateurs bench``: run a declared grid of models x datasets x methods x budgets x seeds.

:func:`load_grid` reads and validates a grid YAML (every name checked before anything runs),
:func:`run_grid` runs it, appending one record per run to a JSON Lines file whose format
(:data:`SCHEMA`, :func:`validate_record`, :func:`read_records`) the HTML report shares, and
:func:`aggregate` turns records into mean and standard deviation over seeds.
"""

from secateurs.bench.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from secateurs.bench.grid import Grid, load_grid, parse_grid
from secateurs.bench.methods import METHODS, BenchMethod, BudgetPoint, PruneContext, Pruned
from secateurs.bench.records import (
    RECORD_KEYS,
    SCHEMA,
    aggregate,
    append_record,
    read_records,
    validate_record,
    without_timing,
)
from secateurs.bench.runner import GridResult, run_grid

__all__ = [
    "CORRUPTIONS",
    "METHODS",
    "RECORD_KEYS",
    "SCHEMA",
    "SEVERITIES",
    "BenchMethod",
    "BudgetPoint",
    "Grid",
    "GridResult",
    "PruneContext",
    "Pruned",
    "aggregate",
    "append_record",
    "corrupt",
    "load_grid",
    "parse_grid",
    "read_records",
    "run_grid",
    "validate_record",
    "without_timing",
]
