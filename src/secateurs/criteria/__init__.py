"""Importance criteria, one family per module, all found by name in :data:`CRITERIA`."""

from secateurs.criteria.base import CRITERIA, Criterion, Stats
from secateurs.criteria.gradient import OBD, Taylor
from secateurs.criteria.magnitude import Magnitude, Random

__all__ = ["CRITERIA", "OBD", "Criterion", "Magnitude", "Random", "Stats", "Taylor"]
