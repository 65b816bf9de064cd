"""Importance criteria, one family per module, all found by name in :data:`CRITERIA`."""

from secateurs.criteria.base import CRITERIA, Criterion, Stats
from secateurs.criteria.channel import ChannelContext, ChannelCriterion, channel_scores
from secateurs.criteria.gradient import OBD, Taylor
from secateurs.criteria.layerwise import OBS, LayerwiseCriterion, SparseGPT, Wanda
from secateurs.criteria.magnitude import Magnitude, Random
from secateurs.criteria.movement import Movement
from secateurs.criteria.structural import (
    FPGM,
    APoZ,
    BNScale,
    ChannelOBS,
    MeanActivation,
    Regression,
)

__all__ = [
    "CRITERIA",
    "FPGM",
    "OBD",
    "OBS",
    "APoZ",
    "BNScale",
    "ChannelContext",
    "ChannelCriterion",
    "ChannelOBS",
    "Criterion",
    "LayerwiseCriterion",
    "Magnitude",
    "MeanActivation",
    "Movement",
    "Random",
    "Regression",
    "SparseGPT",
    "Stats",
    "Taylor",
    "Wanda",
    "channel_scores",
]
