"""Allocation of sparsity across layers, and the exact selection it relies on."""

from secateurs.allocation.base import (
    ALLOCATIONS,
    LAMP,
    Allocation,
    Global,
    LayerMap,
    Pool,
    Uniform,
    check_sparsity,
)
from secateurs.allocation.select import select_lowest

__all__ = [
    "ALLOCATIONS",
    "LAMP",
    "Allocation",
    "Global",
    "LayerMap",
    "Pool",
    "Uniform",
    "check_sparsity",
    "select_lowest",
]
