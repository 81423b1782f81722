"""Registry of convolution module types: the modules after whose output KAP is placed.

A conv type is a module whose output has its channels at dim 1 (``out_channels`` of them) and
which is linear in its ``weight``. Subclasses of a registered type are included, so
``nn.Conv2d`` covers timm's ``Conv2dSame``, ``StdConv2d`` and ``ScaledStdConv2d``.
Register your own conv-like layer with :func:`register_conv_type`.
"""

from __future__ import annotations

from typing import Dict, Tuple, Type

from torch import nn

from .optional import optional_imports

__all__ = ["register_conv_type", "is_conv", "conv_types"]

_CONV_TYPES: Dict[Type[nn.Module], str] = {}


def register_conv_type(cls: Type[nn.Module], reason: str = "") -> Type[nn.Module]:
    """Register ``cls`` (and its subclasses) as a convolution that gets KAP after its output.

    The class must expose ``out_channels`` and return (N, out_channels, ...). Usable as a decorator.

    Example:
        >>> class MyConv(nn.Conv2d): ...
        >>> _ = register_conv_type(MyConv, "custom conv")
        >>> is_conv(MyConv(3, 8, 3))
        True
    """
    _CONV_TYPES[cls] = reason
    return cls


def conv_types() -> Tuple[Type[nn.Module], ...]:
    """All registered conv types."""
    return tuple(_CONV_TYPES)


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a registered conv type."""
    return isinstance(module, conv_types())


register_conv_type(nn.Conv1d, "1-D convolution; subclasses included")
register_conv_type(nn.Conv2d, "2-D convolution; covers timm Conv2dSame / StdConv2d / ScaledStdConv2d")
register_conv_type(nn.Conv3d, "3-D convolution; subclasses included")

for _cond_conv in optional_imports("timm.layers:CondConv2d", used_for="conv type CondConv2d"):
    register_conv_type(_cond_conv, "timm mixture-of-experts conv: calls F.conv2d itself, not an nn.Conv2d")
