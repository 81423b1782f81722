"""Channel dependency analysis: which layers' channel counts must change together.

The model is traced with kapify's FX tracer and run once with an example input (shapes); then one
pass (:mod:`.analysis`) gives each tensor's channel axis a layout of *channel groups*, by rules per
kind of node: :mod:`.node_rules` (functions and tensor methods: residual adds merge groups, a
concat along dim 1 makes a tensor of several groups' segments, permutes/reshapes move the axis)
and :mod:`.module_rules` (layers, through the channel-handler registry of :mod:`..resize`, and rules
for blocks FX keeps whole).
Calls that read a layer's weights (:mod:`.functional_rules`) count as the layer. A split or slice of the channels
(:mod:`.slice_rules`) cuts groups into segments that widen on their own; sizes a block stores are rewritten by its
block handler (:mod:`.blocks`, built-in ones in
:mod:`.zoo_blocks`). Statistics over the channels (LayerNorm, GroupNorm) mark a group *normalised*;
anything the rules do not know *fixes* a group, with the reason. :mod:`.graph` holds the group model.
"""

from . import functional_rules, slice_rules, zoo_blocks  # noqa: F401,E402 - register the slicing and functional rules, built-in block handlers
from .analysis import ChannelAnalysis, Step, analyze_channels, channel_groups
from .blocks import StoredSizes, block_handler, register_block_handler
from .graph import ChannelGraph, ChannelGroup, SliceSite
from .module_rules import layers_in_sequence, register_layer_rule
from .node_rules import register_node_rule

__all__ = [
    "ChannelAnalysis",
    "ChannelGraph",
    "ChannelGroup",
    "SliceSite",
    "Step",
    "StoredSizes",
    "analyze_channels",
    "block_handler",
    "channel_groups",
    "layers_in_sequence",
    "register_block_handler",
    "register_layer_rule",
    "register_node_rule",
]
