"""Attach a channel pool and noise to a convolution's output without changing its parameters.

Like ``torch.nn.utils.parametrize``, the conv keeps its identity and is re-classed in place to a
cached subclass (``KapConv2d`` for ``nn.Conv2d``, ``KapStdConv2d`` for timm's ``StdConv2d`` ...)
whose ``forward`` runs the original conv, then ``kap_pool``, then ``kap_noise``. The conv is still
an instance of its original class, its ``state_dict`` keys are unchanged (pool and noise hold no
tensors), and it works with ``torch.compile``, autocast, channels-last and DDP.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Type

import torch
from torch import nn

__all__ = ["KapConvMixin", "attach_kap", "is_kap_conv", "original_class"]

_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {}


class KapConvMixin:
    """Runs ``kap_pool`` and then ``kap_noise`` (either may be None) on the conv's output."""

    kap_pool: Optional[nn.Module]
    kap_noise: Optional[nn.Module]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(*args, **kwargs)  # type: ignore[misc]
        if self.kap_pool is not None:
            out = self.kap_pool(out)
        if self.kap_noise is not None:
            out = self.kap_noise(out)
        return out

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the generated class cannot be found by name: rebuild it from the original one
        return _restore, (original_class(self), self.__dict__)  # type: ignore[arg-type]


def _restore(cls: Type[nn.Module], state: Dict[str, Any]) -> nn.Module:
    module = cls.__new__(cls)
    module.__dict__.update(state)
    module.__class__ = _kap_class(cls)
    return module


def _kap_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Kap{cls.__name__}", (KapConvMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def attach_kap(conv: nn.Module, pool: Optional[nn.Module], noise: Optional[nn.Module]) -> nn.Module:
    """Re-class ``conv`` in place so that ``pool`` and then ``noise`` follow its output; returns ``conv``.

    Example:
        >>> from kapify.layers import KernelAvgPool
        >>> conv = attach_kap(nn.Conv2d(3, 16, 3), KernelAvgPool(3, grid=(4, 4)), None)
        >>> isinstance(conv, nn.Conv2d), type(conv).__name__
        (True, 'KapConv2d')
    """
    if is_kap_conv(conv):
        raise ValueError(f"{type(conv).__name__} already has KAP attached")
    conv.__class__ = _kap_class(type(conv))
    conv.kap_pool = pool
    conv.kap_noise = noise
    return conv


def is_kap_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a conv with KAP attached by :func:`attach_kap`."""
    return isinstance(module, KapConvMixin)


def original_class(module: nn.Module) -> Type[nn.Module]:
    """The class ``module`` had before :func:`attach_kap`."""
    cls = type(module)
    return cls.__mro__[2] if is_kap_conv(module) else cls
