"""Adaptations of timm/torchvision models, recorded so a checkpoint can replay them.

An adaptation is a function ``fn(model, **options) -> model`` in the :data:`ADAPTATIONS` registry.
:func:`adapt` applies one and appends ``{"name": ..., **options}`` to the model's recorded source,
so :func:`kapify.load` rebuilds the same model (timm model + adaptations + KAP) from a checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Sequence

import torch
from torch import nn

from ..layers.input_stage import add_input_stage
from ..surgery.conv_types import conv_types

__all__ = ["ADAPTATIONS", "register_adaptation", "adapt", "small_image_stem", "normalize_input", "InputNormalize"]

ADAPTATIONS: Dict[str, Callable[..., nn.Module]] = {}


def register_adaptation(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding ``fn(model, **options) -> model`` to :data:`ADAPTATIONS` under ``name``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ADAPTATIONS[name] = fn
        return fn

    return decorator


def adapt(model: nn.Module, name: str, **options: Any) -> nn.Module:
    """Apply adaptation ``name`` to ``model`` (in place) and record it in the model's source.

    Example:
        >>> import kapify
        >>> model = kapify.create_model("resnet18", num_classes=10)
        >>> model = adapt(model, "small_image_stem")
        >>> model.conv1.stride, model.kapify_source["adapt"]
        ((1, 1), [{'name': 'small_image_stem'}])
    """
    if name not in ADAPTATIONS:
        raise ValueError(f"unknown adaptation {name!r}; registered: {sorted(ADAPTATIONS)}")
    model = ADAPTATIONS[name](model, **options)
    source = getattr(model, "kapify_source", None)
    if source is not None:
        source = copy.deepcopy(source)
        source.setdefault("adapt", []).append({"name": name, **options})
        model.kapify_source = source
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@register_adaptation("small_image_stem")  # 32x32 inputs (CIFAR): the paper's CIFAR ResNet18 stem
def small_image_stem(model: nn.Module) -> nn.Module:
    """Adapt an ImageNet model to 32x32 images as the usual CIFAR ResNet18 does (paper §4.3):
    the first conv becomes 3x3 stride 1 (same channels), and a stem max-pool (a ``MaxPool2d`` that
    is a child of the model or of its ``stem``, e.g. ResNet's ``maxpool``) becomes ``Identity``.

    In place; the rest of the architecture is timm's/torchvision's own (no fork of the model).

    Example:
        >>> import timm
        >>> m = small_image_stem(timm.create_model("resnet18", num_classes=10))
        >>> m.conv1, m.maxpool
        (Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False), Identity())
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, conv_types()) and isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no 2-D convolution to turn into a small-image stem")
    name, first = convs[0]
    stem = nn.Conv2d(first.in_channels, first.out_channels, 3, stride=1, padding=1, bias=first.bias is not None)
    stem.to(device=first.weight.device, dtype=first.weight.dtype)
    _replace(model, name, stem)
    for pool_name, module in list(model.named_modules()):
        top = pool_name.split(".")[0]
        if isinstance(module, nn.MaxPool2d) and ("." not in pool_name or top == "stem"):
            _replace(model, pool_name, nn.Identity())
            break
    return model


class InputNormalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are non-persistent buffers (state_dict unchanged)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(float(s) <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # an input stage is not a child module, so .to(device) does not move it: follow the input
        return (x - self.mean.to(x)) / self.std.to(x)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


@register_adaptation("normalize_input")  # the model takes [0,1] pixels: noise, attacks and eps live in pixel space
def normalize_input(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Make ``model`` take [0, 1] pixels: its input is normalised by ``(x - mean) / std`` inside it
    (an input stage run by a forward pre-hook; the model keeps its class and state_dict keys). kapify's input noise is
    added before this normalisation, in pixel space, as in the paper.

    Example:
        >>> import timm
        >>> m = normalize_input(timm.create_model("resnet18"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        >>> m.kapify_normalize
        InputNormalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    """
    if hasattr(model, "kapify_normalize"):
        raise ValueError(f"{type(model).__name__} already normalises its input ({model.kapify_normalize})")
    add_input_stage(model, "kapify_normalize", InputNormalize(mean, std))
    return model


@register_adaptation("rewiden")  # kapify.rewiden with a named width rule, e.g. {"name": "mult", "m": 4}
def rewiden_adaptation(model: nn.Module, rule: Any, function_preserving: bool = False) -> nn.Module:
    """:func:`kapify.rewiden` by a *named* rule (``"square"`` or ``{"name": "mult", "m": 4}``), so
    that a checkpoint can replay it. Returns a new model (the input is left as it is)."""
    from ..surgery.rewiden import rewiden

    if callable(rule):
        raise ValueError(
            "only named width rules can be recorded; call kapify.rewiden(model, fn) directly for a callable"
        )
    new = rewiden(model, rule, function_preserving=function_preserving)
    return new
