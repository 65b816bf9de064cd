"""Importance criteria, one family per module, all found by name in :data:`CRITERIA`."""

from secateurs.criteria.base import CRITERIA, Criterion, Stats
from secateurs.criteria.channel import ChannelContext, ChannelCriterion, channel_scores
from secateurs.criteria.gradient import OBD, Taylor
from secateurs.criteria.magnitude import Magnitude, Random
from secateurs.criteria.structural import FPGM, APoZ, BNScale, MeanActivation, Regression

__all__ = [
    "CRITERIA",
    "FPGM",
    "OBD",
    "APoZ",
    "BNScale",
    "ChannelContext",
    "ChannelCriterion",
    "Criterion",
    "Magnitude",
    "MeanActivation",
    "Random",
    "Regression",
    "Stats",
    "Taylor",
    "channel_scores",
]
