"""Teach kapify a model it has no rule for: every kind of rule, registered the same way, in one place.

Each ``register_*`` takes what the rule matches (a class, a function, a method name), what it does, and a
``reason`` (listed by :func:`registered`). Which kind you need (docs/extending.md):

- ``register_conv_type(MyConv)``: a conv module KAP should follow (it exposes ``out_channels``);
- ``register_channel_handler(MyNorm, ChannelwiseHandler("dim"))``: a layer with channel-sized parameters;
- ``register_leaf_module(MyBlock)``: a block FX must not trace through (data-dependent control flow);
- ``register_layer_rule(MyBlock)``: how such a leaf block lays out its output channels;
- ``register_block_handler(MyBlock)``: a block that stores the sizes it splits its channels at;
- ``register_node_rule(my_function)``: a function or tensor method the channel analysis should follow.

:func:`scoped` undoes every registration made inside it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Scale(nn.Module):  # one learned factor per channel, its width in ``dim``
    ...     def __init__(self, dim):
    ...         super().__init__()
    ...         self.dim, self.weight = dim, nn.Parameter(torch.ones(dim))
    ...     def forward(self, x):
    ...         return x * self.weight[:, None, None]
    >>> with scoped():
    ...     register_channel_handler(Scale, ChannelwiseHandler("dim"), reason="a per-channel scale")
    ...     [key.__name__ for _, key, _ in registered("channel handler") if key is Scale]
    ['Scale']
    >>> any(key is Scale for _, key, _ in registered("channel handler"))
    False
"""

from .surgery.channels import StoredSizes, layers_in_sequence, register_block_handler, register_layer_rule
from .surgery.channels.node_rules import register_node_rule
from .surgery.conv_types import register_conv_type
from .surgery.handlers import (
    ChannelHandler,
    ChannelwiseHandler,
    CondConvHandler,
    ConvHandler,
    GroupNormHandler,
    LinearHandler,
    MultiheadAttentionHandler,
    register_channel_handler,
)
from .surgery.registry import registered, scoped
from .surgery.tracing import register_leaf_module

__all__ = [
    "ChannelHandler",
    "ChannelwiseHandler",
    "CondConvHandler",
    "ConvHandler",
    "GroupNormHandler",
    "LinearHandler",
    "MultiheadAttentionHandler",
    "StoredSizes",
    "layers_in_sequence",
    "register_block_handler",
    "register_channel_handler",
    "register_conv_type",
    "register_layer_rule",
    "register_leaf_module",
    "register_node_rule",
    "registered",
    "scoped",
]
