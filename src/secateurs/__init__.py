"""secateurs: pruning and sparsity for PyTorch that proves what it buys.

The public surface, re-exported here; everything else is internal::

    import secateurs as sc
    sc.prune_(model, sparsity=0.9)
    print(sc.summary(model))
    sc.make_permanent_(model)
"""

from secateurs._version import __version__
from secateurs.allocation import ALLOCATIONS, ERK, LAMP, OWL, Allocation, Global, LayerMap, Uniform
from secateurs.budgets import BUDGETS, Budget, Bytes, Latency, MACs, Params, Sparsity
from secateurs.compress import (
    CompressConfig,
    LowRankReport,
    SparsifyReport,
    densify_,
    factorize_,
    fold_batchnorm,
    inspect_compressed,
    load_compressed,
    save_compressed,
    share_weights_,
    sparsify_,
)
from secateurs.criteria import (
    CRITERIA,
    FPGM,
    OBD,
    OBS,
    APoZ,
    BNScale,
    Criterion,
    Magnitude,
    MeanActivation,
    Movement,
    Random,
    Regression,
    SparseGPT,
    Taylor,
    Wanda,
)
from secateurs.errors import BudgetError, ConfigError, DataError, ModelError, SecateursError
from secateurs.export import (
    ExportReport,
    export_huggingface,
    export_onnx,
    export_safetensors,
    load_safetensors,
)
from secateurs.graph import ChannelPlan, apply_plan_
from secateurs.masks import (
    apply_masks_,
    collect_masks,
    load_masked_state_dict_,
    make_permanent_,
)
from secateurs.metrics import evaluate, measure_latency, profile, summary
from secateurs.oneshot import DepthReport, OneShotReport, drop_blocks
from secateurs.provenance import report_of
from secateurs.pruner import PruneConfig, Pruner, prune_
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
from secateurs.search import AMC, SEARCHES, NetAdapt, SearchResult, Sensitivity, search_allocation
from secateurs.shrink import ShrinkConfig, ShrinkReport, shrink
from secateurs.structures import NM, STRUCTURES, Blocks, Channels, Elements, Structure

__all__ = [
    "ALLOCATIONS",
    "AMC",
    "BUDGETS",
    "CRITERIA",
    "DSD",
    "ERK",
    "FPGM",
    "IHT",
    "LAMP",
    "NM",
    "OBD",
    "OBS",
    "OWL",
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
    "ChannelPlan",
    "Channels",
    "CompressConfig",
    "ConfigError",
    "Criterion",
    "DataError",
    "DepthReport",
    "Elements",
    "ExportReport",
    "Global",
    "Gradual",
    "Iterative",
    "Latency",
    "LayerMap",
    "Lottery",
    "LowRankReport",
    "MACs",
    "Magnitude",
    "MeanActivation",
    "ModelError",
    "Movement",
    "NetAdapt",
    "OneShot",
    "OneShotReport",
    "Params",
    "PruneConfig",
    "Pruner",
    "Random",
    "Regression",
    "RigL",
    "Schedule",
    "SearchResult",
    "SecateursError",
    "Sensitivity",
    "ShrinkConfig",
    "ShrinkReport",
    "SparseGPT",
    "SparsifyReport",
    "Sparsity",
    "Static",
    "Structure",
    "Taylor",
    "Uniform",
    "Wanda",
    "__version__",
    "apply_masks_",
    "apply_plan_",
    "collect_masks",
    "densify_",
    "drop_blocks",
    "evaluate",
    "export_huggingface",
    "export_onnx",
    "export_safetensors",
    "factorize_",
    "fold_batchnorm",
    "inspect_compressed",
    "load_compressed",
    "load_masked_state_dict_",
    "load_safetensors",
    "make_permanent_",
    "measure_latency",
    "profile",
    "prune_",
    "report_of",
    "save_compressed",
    "search_allocation",
    "share_weights_",
    "shrink",
    "sparsify_",
    "summary",
]


def __dir__() -> list[str]:
    """What ``dir(secateurs)`` shows: the public surface, not the submodules it is built of."""
    return list(__all__)
