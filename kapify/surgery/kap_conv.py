"""Attach a channel pool and noise to a convolution's output without changing its parameters.

The pool runs on the conv's output (``impl="activation"``) or, for an average pool after a plain
ungrouped conv, on the conv's filters (``impl="weight"``, paper Eq. 3): same outputs and gradients.
``impl="auto"`` picks, call by call, whichever of the two tensors is smaller: the filters in early
layers and at large batch sizes, the output in late layers at small batch sizes (at batch 32 a
ResNet18's last filter bank holds 9x more numbers than its output).

Like ``torch.nn.utils.parametrize``, the conv keeps its identity and is re-classed in place to a
cached subclass (``KapConv2d`` for ``nn.Conv2d``, ``KapStdConv2d`` for timm's ``StdConv2d`` ...)
whose ``forward`` runs the original conv, then ``kap_pool``, then ``kap_noise``. The conv is still
an instance of its original class, its ``state_dict`` keys are unchanged (pool and noise hold no
tensors), and it works with ``torch.compile``, autocast, channels-last and DDP.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Literal, Optional, Type

import torch
from torch import nn

from ..layers import KernelAvgPool, pool_conv_weight

__all__ = [
    "KapConvMixin",
    "attach_kap",
    "detach_kap",
    "is_kap_conv",
    "original_class",
    "set_blend",
    "plain_ungrouped",
    "weight_poolable",
    "Impl",
]

Impl = Literal["activation", "weight", "auto"]
_PLAIN_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)

_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {}


class KapConvMixin:
    """Runs ``kap_pool`` and then ``kap_noise`` (either may be None) on the conv's output."""

    kap_pool: Optional[nn.Module]
    kap_noise: Optional[nn.Module]
    kap_impl: Impl

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kap_impl == "weight" or (self.kap_impl == "auto" and self._filters_smaller(args[0])):
            weight, bias = self.pooled_weight()
            out = self._conv_forward(*args, weight, bias)  # type: ignore[attr-defined]
        else:
            out = super().forward(*args, **kwargs)  # type: ignore[misc]
            if self.kap_pool is not None:
                blend = self.__dict__.get("kap_blend", 1.0)
                pooled = self.kap_pool(out)
                out = pooled if blend == 1.0 else torch.lerp(out[:, : pooled.shape[1]], pooled, blend)
        if self.kap_noise is not None:
            out = self.kap_noise(out, reuse_input=True)  # out is this call's own tensor
        return out

    def _filters_smaller(self, x: torch.Tensor) -> bool:
        """Whether the filter bank has fewer numbers than this call's output (pooling is linear in either)."""
        outputs = x.numel() // self.in_channels * self.out_channels // math.prod(self.stride)  # type: ignore[attr-defined]
        return self.weight.numel() <= outputs  # type: ignore[attr-defined]

    def pooled_weight(self) -> tuple:
        """The conv's (weight, bias) averaged by its pool, blended with the unpooled ones by ``kap_blend``
        (1: KAP): the filters of the equivalent plain conv."""
        pool = self.kap_pool
        weight, bias = pool_conv_weight(self.weight, self.bias, pool.kernel_size, pool.stride, pool.grid, pool.keep)  # type: ignore
        blend = self.__dict__.get("kap_blend", 1.0)
        if blend != 1.0:  # y = (1-a) conv(x) + a KAP(conv(x)): one filter bank, since both are linear in the filters
            kept = len(weight)  # a sheet with spare filters passes on its first ones
            weight = torch.lerp(self.weight[:kept], weight, blend)  # type: ignore[attr-defined]
            bias = None if bias is None else torch.lerp(self.bias[:kept], bias, blend)  # type: ignore[attr-defined]
        return weight, bias

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles instead: a :class:`~kapify.surgery.scripting.ScriptableKapConv`."""
        from ..layers.input_stage import hosted_stages
        from .scripting import ScriptableKapConv

        plain = original_class(self).__new__(original_class(self))  # the conv alone, sharing parameters
        plain.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("kap_")})
        plain._modules = {k: m for k, m in self._modules.items() if not k.startswith("kap_")}  # type: ignore[assignment]
        plain._forward_pre_hooks = type(self._forward_pre_hooks)()
        twin = ScriptableKapConv(
            plain, self.kap_pool, self.kap_noise, self.__dict__.get("kap_blend", 1.0), hosted_stages(self)
        )
        # torch.jit.script swaps the twin in for this conv and keys its memo of prepared modules by id():
        # keep this conv alive, so that its id is not reused by a later module (in a tuple: not a submodule)
        twin.__dict__["_prepared_from"] = (self,)
        return twin.train(self.training)  # the stages (not submodules here, submodules there) follow the model's mode

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the generated class cannot be found by name: rebuild it from the original one
        return _restore, (original_class(self), self.__dict__)  # type: ignore[arg-type]


def _restore(cls: Type[nn.Module], state: Dict[str, Any]) -> nn.Module:
    module = cls.__new__(cls)
    module.__dict__.update(state)
    module.__class__ = _kap_class(cls)
    return module


def _kap_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    """The cached ``Kap<cls>`` subclass. It is a leaf for FX feature extractors, as its conv is: it
    keeps the conv's ``__module__`` (torch.fx and torchvision's tracer do not trace into ``torch.nn``
    modules) and is registered with timm's not-traced modules (timm's own conv types)."""
    if cls not in _CLASSES:
        kap = type(
            f"Kap{cls.__name__}",
            (KapConvMixin, cls),
            {"__module__": cls.__module__, "__qualname__": f"Kap{cls.__qualname__}"},
        )
        try:
            from timm.layers import register_notrace_module

            register_notrace_module(kap)
        except ImportError:  # timm is optional here
            pass
        _CLASSES[cls] = kap
    return _CLASSES[cls]


def plain_ungrouped(conv: nn.Module) -> bool:
    """Whether ``conv`` runs torch's own forward with one group: an average pool after it can run on its filters.
    Grouped convs are excluded: averaging filters of different groups would need inputs from several groups."""
    return getattr(conv, "groups", 1) == 1 and getattr(original_class(conv), "forward", None) in _PLAIN_FORWARDS


def weight_poolable(conv: nn.Module, pool: Optional[nn.Module]) -> bool:
    """Whether ``pool`` after ``conv`` can run on the conv's filters: an average pool after a plain ungrouped conv."""
    return isinstance(pool, KernelAvgPool) and plain_ungrouped(conv)


def attach_kap(
    conv: nn.Module, pool: Optional[nn.Module], noise: Optional[nn.Module], impl: Impl = "activation"
) -> nn.Module:
    """Re-class ``conv`` in place so that ``pool`` and then ``noise`` follow its output; returns ``conv``.

    ``impl="weight"`` runs the pool on the filters (see :func:`weight_poolable`), ``"auto"`` on the
    filters or the output, whichever is smaller in each call.

    Example:
        >>> from kapify.layers import KernelAvgPool
        >>> conv = attach_kap(nn.Conv2d(3, 16, 3), KernelAvgPool(3, grid=(4, 4)), None)
        >>> isinstance(conv, nn.Conv2d), type(conv).__name__
        (True, 'KapConv2d')
    """
    if is_kap_conv(conv):
        raise ValueError(f"{type(conv).__name__} already has KAP attached")
    if impl in ("weight", "auto") and not weight_poolable(conv, pool):
        raise ValueError(
            f"{type(conv).__name__} (groups={getattr(conv, 'groups', 1)}) with {type(pool).__name__} cannot pool "
            f"its weights: that needs an average pool after a plain, ungrouped conv; use impl='activation'"
        )
    conv.__class__ = _kap_class(type(conv))
    conv.kap_pool = pool
    conv.kap_noise = noise
    conv.kap_impl = impl
    return conv


def set_blend(model: nn.Module, blend: float) -> int:
    """Set the KAP warm-start blend ``a`` of every average-pooling conv in ``model``: each computes
    ``(1 - a) conv(x) + a KAP(conv(x))``, so ``a=0`` is the unpooled model and ``a=1`` (the default)
    is KAP; ramp it from 0 to 1 while fine-tuning a trained model. Returns the number of convs set.

    Example:
        >>> from kapify.layers import KernelAvgPool
        >>> conv = attach_kap(nn.Conv2d(3, 16, 3), KernelAvgPool(3, grid=(4, 4)), None)
        >>> x = torch.ones(1, 3, 5, 5)
        >>> set_blend(conv, 0.0), torch.equal(conv(x), nn.Conv2d.forward(conv, x))
        (1, True)
    """
    a = float(blend)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"blend must be in [0, 1] (0: no pooling, 1: KAP), got {blend!r}")
    changed = 0
    for module in model.modules():
        if is_kap_conv(module) and isinstance(module.kap_pool, KernelAvgPool):
            if module.kap_pool.stride != 1:
                raise ValueError(
                    f"{type(module).__name__} pools with stride {module.kap_pool.stride} (kernel-size multiplier): "
                    f"its pooled output has fewer channels than the conv's, so it cannot be blended with it"
                )
            module.kap_blend = a
            changed += 1
    from .config import get_config

    config = get_config(model)
    if config is not None:
        config.blend = a
    return changed


def detach_kap(conv: nn.Module) -> nn.Module:
    """Undo :func:`attach_kap`: ``conv`` gets back its original class, without pool and noise."""
    cls = original_class(conv)
    for name in ("kap_pool", "kap_noise", "kap_impl", "kap_blend"):
        if name in conv._modules:
            del conv._modules[name]
        conv.__dict__.pop(name, None)
    conv.__class__ = cls
    return conv


def is_kap_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a conv with KAP attached by :func:`attach_kap`."""
    return isinstance(module, KapConvMixin)


def original_class(module: nn.Module) -> Type[nn.Module]:
    """The class ``module`` had before :func:`attach_kap`."""
    cls = type(module)
    return cls.__mro__[2] if is_kap_conv(module) else cls
