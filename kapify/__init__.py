"""kapify: make any CNN robust to adversarial attacks with Kernel Average Pooling (KAP).

Example:
    >>> import timm, kapify
    >>> model = kapify.convert(timm.create_model("resnet18"), k=3, sigma=0.1)
    >>> print(kapify.summary(model))  # doctest: +SKIP
"""

from . import data, evaluation, extend, models
from .layers import ChannelGrid, GaussianNoise, KernelAvgPool, KernelMaxPool, channel_pool, set_noise
from .models.factory import create_model
from .reporting import summary
from .serialization import load, load_config, load_extra, save
from .surgery import (
    ChannelHandler,
    ChannelwiseHandler,
    ConvHandler,
    GroupNormHandler,
    KapConfig,
    LinearHandler,
    TracingError,
    arrange_channels,
    channel_groups,
    convert,
    fold,
    get_config,
    is_converted,
    register_block_handler,
    register_channel_handler,
    register_conv_type,
    register_layer_rule,
    register_leaf_module,
    register_node_rule,
    rewiden,
    set_blend,
    square_width,
    width_mult,
)
from .surgery.optional import diagnostics
from .versions import __version__ as __version__

__all__ = [
    "data",  # subpackages: kapify.data.cifar10(...), kapify.evaluation.evaluate(...), kapify.models.adapt(...)
    "evaluation",
    "extend",
    "models",
    "set_blend",
    "arrange_channels",
    "ChannelGrid",
    "ChannelHandler",
    "ChannelwiseHandler",
    "ConvHandler",
    "GroupNormHandler",
    "LinearHandler",
    "channel_groups",
    "register_block_handler",
    "register_channel_handler",
    "register_layer_rule",
    "register_node_rule",
    "rewiden",
    "square_width",
    "width_mult",
    "GaussianNoise",
    "KapConfig",
    "KernelAvgPool",
    "KernelMaxPool",
    "TracingError",
    "channel_pool",
    "convert",
    "create_model",
    "diagnostics",
    "fold",
    "get_config",
    "is_converted",
    "load",
    "load_config",
    "load_extra",
    "register_conv_type",
    "register_leaf_module",
    "save",
    "set_noise",
    "summary",
]
