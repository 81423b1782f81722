"""Channel dependency analysis: which layers' channel counts must change together.

The model is traced with kapify's FX tracer and run once with an example input (shapes); then one
pass (:mod:`.analysis`) gives each tensor's channel axis a layout of *channel groups*, by rules per
kind of node: :mod:`.node_rules` (functions and tensor methods: residual adds merge groups, a
concat along dim 1 makes a tensor of several groups' segments, permutes/reshapes move the axis)
and :mod:`.module_rules` (layers, through the channel-handler registry of :mod:`..resize`).
Statistics over the channels (LayerNorm, GroupNorm) mark a group *normalised*; anything the rules
do not know *fixes* a group, with the reason. :mod:`.graph` holds the group model.
"""
from .analysis import ChannelAnalysis, Step, analyze_channels, channel_groups
from .graph import ChannelGraph, ChannelGroup
from .node_rules import register_node_rule

__all__ = ["ChannelAnalysis", "ChannelGraph", "ChannelGroup", "Step", "analyze_channels", "channel_groups", "register_node_rule"]
