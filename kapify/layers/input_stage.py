"""Modules applied to a model's input by a forward pre-hook (input noise, pixel normalisation).

A stage is kept in the model's ``__dict__``, not registered as a child module: a child of an
``nn.Sequential`` would also run as its last layer. The hook gives the stage the model's
train/eval flag on every call, so ``model.train()`` / ``model.eval()`` reach it as usual.
"""
from __future__ import annotations

import functools
from typing import List

from torch import nn

__all__ = ["add_input_stage", "remove_input_stage", "input_stages"]


def _run_stage(model: nn.Module, args: tuple, *, attr: str) -> tuple:
    stage = model.__dict__[attr]
    stage.train(model.training)
    return (stage(args[0]),) + tuple(args[1:])


def add_input_stage(model: nn.Module, attr: str, stage: nn.Module, first: bool = False) -> None:
    """Run ``stage`` on the model's first input before ``forward``; ``first`` puts it before the
    stages already there. It is reachable as ``getattr(model, attr)``.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Identity())
        >>> add_input_stage(model, "upsample", nn.Upsample(scale_factor=2))
        >>> model(torch.ones(1, 1, 2)).shape, len(model)
        (torch.Size([1, 1, 4]), 1)
    """
    if attr in model.__dict__ or hasattr(model, attr):
        raise ValueError(f"{type(model).__name__} already has an attribute {attr!r}")
    object.__setattr__(model, attr, stage)
    model.register_forward_pre_hook(functools.partial(_run_stage, attr=attr), prepend=first)


def _stage_hooks(model: nn.Module, attr: str) -> List[int]:
    return [
        hook_id for hook_id, hook in model._forward_pre_hooks.items()
        if isinstance(hook, functools.partial) and hook.func is _run_stage and hook.keywords.get("attr") == attr
    ]


def remove_input_stage(model: nn.Module, attr: str) -> None:
    """Remove the stage ``attr`` and its hook (no-op if absent)."""
    for hook_id in _stage_hooks(model, attr):
        del model._forward_pre_hooks[hook_id]
    model.__dict__.pop(attr, None)


def input_stages(model: nn.Module) -> List[nn.Module]:
    """The stages of ``model``, in the order they run."""
    attrs = [hook.keywords["attr"] for hook in model._forward_pre_hooks.values()
             if isinstance(hook, functools.partial) and hook.func is _run_stage]
    return [model.__dict__[a] for a in attrs if a in model.__dict__]
