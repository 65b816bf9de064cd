"""Allocation of sparsity across layers, and the exact selection it relies on."""

from secateurs.allocation.base import (
    ALLOCATIONS,
    LAMP,
    Allocation,
    Global,
    LayerMap,
    Pool,
    Uniform,
)
from secateurs.allocation.erk import ERK, erk_densities
from secateurs.allocation.owl import OWL
from secateurs.allocation.select import select_lowest

__all__ = [
    "ALLOCATIONS",
    "ERK",
    "LAMP",
    "OWL",
    "Allocation",
    "Global",
    "LayerMap",
    "Pool",
    "Uniform",
    "erk_densities",
    "select_lowest",
]
