"""Model surgery: find every convolution through torch.fx and attach KAP and noise after it."""
from .config import KapConfig, LayerRecord, get_config, is_converted
from .conv_sites import ConvSites, find_conv_sites
from .conv_types import is_conv, register_conv_type
from .convert import convert
from .fold import fold
from .kap_conv import attach_kap, is_kap_conv
from .tracing import TracingError, register_leaf_module, trace

__all__ = [
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
