"""Automatic per-layer ratios: searches that turn a budget into a ratio map.

The searches sit above the pruner and ``shrink``, which they call to try candidates; neither
imports them. Importing this package registers every search in :data:`SEARCHES`:
``sensitivity`` (per-layer scan and a threshold on the drop), ``amc`` (a DDPG agent) and
``netadapt`` (measured latency, short fine-tuning per candidate). :func:`search_allocation` is
the one entry point.
"""

from secateurs.search.amc import AMC
from secateurs.search.base import (
    SEARCHES,
    AllocationSearch,
    SearchContext,
    SearchResult,
    accuracy_evaluator,
    search_allocation,
)
from secateurs.search.netadapt import NetAdapt
from secateurs.search.sensitivity import Sensitivity
from secateurs.search.space import ChannelSpace, ElementSpace, Layer, LayerSpace

__all__ = [
    "AMC",
    "SEARCHES",
    "AllocationSearch",
    "ChannelSpace",
    "ElementSpace",
    "Layer",
    "LayerSpace",
    "NetAdapt",
    "SearchContext",
    "SearchResult",
    "Sensitivity",
    "accuracy_evaluator",
    "search_allocation",
]
