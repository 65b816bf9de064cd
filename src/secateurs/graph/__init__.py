"""Structural pruning: trace a model, find coupled channel groups, remove channels for real."""

from secateurs.graph.groups import ChannelGraph, ChannelGroup, Member, build_graph
from secateurs.graph.surgery import ChannelPlan, apply_plan_, mask_plan_, plan_from_removed

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "ChannelPlan",
    "Member",
    "apply_plan_",
    "build_graph",
    "mask_plan_",
    "plan_from_removed",
]
