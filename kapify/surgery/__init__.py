"""Model surgery: find every convolution through torch.fx and attach KAP and noise after it."""

from .arrange import arrange_channels
from .channels import (
    ChannelGroup,
    StoredSizes,
    analyze_channels,
    channel_groups,
    register_block_handler,
    register_layer_rule,
    register_node_rule,
)
from .config import KapConfig, LayerRecord, get_config, is_converted
from .conv_sites import ConvSites, find_conv_sites
from .conv_types import is_conv, register_conv_type
from .convert import convert
from .fold import fold
from .handlers import (
    ChannelHandler,
    ChannelwiseHandler,
    ConvHandler,
    GroupNormHandler,
    LinearHandler,
    register_channel_handler,
)
from .kap_conv import attach_kap, is_kap_conv, set_blend
from .rewiden import rewiden, square_width, width_mult
from .tracing import TracingError, register_leaf_module, trace

__all__ = [
    "set_blend",
    "arrange_channels",
    "ChannelGroup",
    "ChannelHandler",
    "ChannelwiseHandler",
    "ConvHandler",
    "GroupNormHandler",
    "LinearHandler",
    "analyze_channels",
    "channel_groups",
    "register_channel_handler",
    "register_block_handler",
    "register_node_rule",
    "register_layer_rule",
    "StoredSizes",
    "rewiden",
    "square_width",
    "width_mult",
    "ConvSites",
    "KapConfig",
    "LayerRecord",
    "TracingError",
    "attach_kap",
    "convert",
    "find_conv_sites",
    "fold",
    "get_config",
    "is_conv",
    "is_converted",
    "is_kap_conv",
    "register_conv_type",
    "register_leaf_module",
    "trace",
]
