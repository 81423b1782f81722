"""Layers: channel pooling (KAP/KMP), Gaussian noise, channel grids."""

from .channel_pool import KernelAvgPool, KernelMaxPool, PoolMode, channel_pool, check_kernel_size, check_stride
from .grid import ChannelGrid, line_grid, rect_grid
from .noise import GaussianNoise, check_sigma, set_noise
from .weight_pool import pool_conv_weight

__all__ = [
    "ChannelGrid",
    "GaussianNoise",
    "KernelAvgPool",
    "KernelMaxPool",
    "PoolMode",
    "channel_pool",
    "check_kernel_size",
    "check_stride",
    "check_sigma",
    "line_grid",
    "pool_conv_weight",
    "rect_grid",
    "set_noise",
]
