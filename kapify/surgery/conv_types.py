"""Registry of convolution module types: the modules after whose output KAP is placed.

A conv type is a module whose output has its channels at dim 1 (``out_channels`` of them) and
which is linear in its ``weight``. Subclasses of a registered type are included, so
``nn.Conv2d`` covers timm's ``Conv2dSame``, ``StdConv2d`` and ``ScaledStdConv2d``.
Register your own conv-like layer with :func:`register_conv_type`.
"""

from __future__ import annotations

from typing import Tuple, Type

from torch import nn

from .optional import optional_imports
from .registry import Registry

__all__ = ["CONV_TYPES", "register_conv_type", "is_conv", "conv_types"]

#: the module classes that get KAP after their output (subclasses included)
CONV_TYPES: Registry[Type[nn.Module]] = Registry("conv type")


def register_conv_type(cls: Type[nn.Module], reason: str = "") -> Type[nn.Module]:
    """Register ``cls`` (and its subclasses) as a convolution that gets KAP after its output.

    The class must expose ``out_channels`` and return (N, out_channels, ...). Usable as a decorator.

    Example:
        >>> class MyConv(nn.Conv2d): ...
        >>> _ = register_conv_type(MyConv, "custom conv")
        >>> is_conv(MyConv(3, 8, 3))
        True
    """
    CONV_TYPES.add(cls, cls, reason)
    return cls


def conv_types() -> Tuple[Type[nn.Module], ...]:
    """All registered conv types."""
    return CONV_TYPES.keys()  # type: ignore[return-value]


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a registered conv type."""
    return isinstance(module, conv_types())


register_conv_type(nn.Conv1d, "1-D convolution; subclasses included")
register_conv_type(nn.Conv2d, "2-D convolution; covers timm Conv2dSame / StdConv2d / ScaledStdConv2d")
register_conv_type(nn.Conv3d, "3-D convolution; subclasses included")

for _cond_conv in optional_imports("timm.layers:CondConv2d", used_for="conv type CondConv2d"):
    register_conv_type(_cond_conv, "timm mixture-of-experts conv: calls F.conv2d itself, not an nn.Conv2d")
