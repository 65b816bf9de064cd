"""One-shot pruning of large models, layer by layer from calibration inputs, block by block.

:func:`prune_layerwise_` is the engine the layer-wise criteria (``wanda``, ``sparsegpt``,
``obs``) run in when :class:`~secateurs.Pruner` prunes with them; :func:`find_blocks` finds
the repeated blocks it walks; :func:`block_influence` scores whole blocks for depth pruning.
"""

from secateurs.oneshot.blocks import BlockInput, capture_block_inputs, find_blocks, run_block
from secateurs.oneshot.depth import DepthReport, block_influence, drop_blocks
from secateurs.oneshot.engine import (
    LayerReport,
    OneShotReport,
    Progress,
    column_norms,
    layer_of,
    layerwise_targets,
    peak_rss_mb,
    prune_layerwise_,
)

__all__ = [
    "BlockInput",
    "DepthReport",
    "LayerReport",
    "OneShotReport",
    "Progress",
    "block_influence",
    "capture_block_inputs",
    "column_norms",
    "drop_blocks",
    "find_blocks",
    "layer_of",
    "layerwise_targets",
    "peak_rss_mb",
    "prune_layerwise_",
    "run_block",
]
