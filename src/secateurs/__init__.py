"""secateurs: pruning and sparsity for PyTorch that proves what it buys.

The public surface, re-exported here; everything else is internal::

    import secateurs as sc
    sc.prune_(model, sparsity=0.9)
    print(sc.summary(model))
    sc.make_permanent_(model)
"""

from secateurs._version import __version__
from secateurs.allocation import ALLOCATIONS, ERK, LAMP, Allocation, Global, LayerMap, Uniform
from secateurs.budgets import BUDGETS, Budget, Bytes, Latency, MACs, Params, Sparsity
from secateurs.compress import (
    CompressConfig,
    inspect_compressed,
    load_compressed,
    save_compressed,
    share_weights_,
)
from secateurs.criteria import (
    CRITERIA,
    FPGM,
    OBD,
    APoZ,
    BNScale,
    Criterion,
    Magnitude,
    MeanActivation,
    Random,
    Regression,
    Taylor,
)
from secateurs.errors import BudgetError, ConfigError, DataError, ModelError, SecateursError
from secateurs.export import ExportReport, export_onnx, export_safetensors, load_safetensors
from secateurs.graph import ChannelGraph, ChannelPlan, apply_plan_, build_graph
from secateurs.masks import (
    apply_masks_,
    collect_masks,
    load_masked_state_dict_,
    make_permanent_,
)
from secateurs.metrics import summary
from secateurs.pruner import Pruner, compute_masks, prune_
from secateurs.schedules import (
    DSD,
    IHT,
    SCHEDULES,
    SET,
    Gradual,
    Iterative,
    Lottery,
    OneShot,
    RigL,
    Schedule,
    Static,
)
from secateurs.search import SEARCHES, SearchResult, search_allocation
from secateurs.shrink import ShrinkReport, shrink
from secateurs.structures import NM, STRUCTURES, Blocks, Channels, Elements, Structure
from secateurs.targets import Target, find_targets

__all__ = [
    "ALLOCATIONS",
    "BUDGETS",
    "CRITERIA",
    "DSD",
    "ERK",
    "FPGM",
    "IHT",
    "LAMP",
    "NM",
    "OBD",
    "SCHEDULES",
    "SEARCHES",
    "SET",
    "STRUCTURES",
    "APoZ",
    "Allocation",
    "BNScale",
    "Blocks",
    "Budget",
    "BudgetError",
    "Bytes",
    "ChannelGraph",
    "ChannelPlan",
    "Channels",
    "CompressConfig",
    "ConfigError",
    "Criterion",
    "DataError",
    "Elements",
    "ExportReport",
    "Global",
    "Gradual",
    "Iterative",
    "Latency",
    "LayerMap",
    "Lottery",
    "MACs",
    "Magnitude",
    "MeanActivation",
    "ModelError",
    "OneShot",
    "Params",
    "Pruner",
    "Random",
    "Regression",
    "RigL",
    "Schedule",
    "SearchResult",
    "SecateursError",
    "ShrinkReport",
    "Sparsity",
    "Static",
    "Structure",
    "Target",
    "Taylor",
    "Uniform",
    "__version__",
    "apply_masks_",
    "apply_plan_",
    "build_graph",
    "collect_masks",
    "compute_masks",
    "export_onnx",
    "export_safetensors",
    "find_targets",
    "inspect_compressed",
    "load_compressed",
    "load_masked_state_dict_",
    "load_safetensors",
    "make_permanent_",
    "prune_",
    "save_compressed",
    "search_allocation",
    "share_weights_",
    "shrink",
    "summary",
]
