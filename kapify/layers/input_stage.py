"""Modules applied to a model's input by a forward pre-hook (input noise, pixel normalisation).

A stage is kept in the model's ``__dict__``, not registered as a child module: a child of an
``nn.Sequential`` would also run as its last layer, and ``state_dict`` keys stay those of the
model. The hook gives the stage its host's train/eval flag on every call, so ``model.train()`` /
``model.eval()`` reach it as usual.

The hooks start on the model's own call. :func:`move_input_stages` moves them to the one module
that consumes the raw input (``convert`` does this when the traced graph shows one, e.g. a
ResNet's ``conv1``), so that every entry point (``forward_features``, ``forward_intermediates``,
FX feature extractors) runs them, not only ``model(x)``.

TorchScript compiles no Python hook: ``torch.jit.script`` asks each module for
``__prepare_scriptable__()`` first. A Kap conv that hosts stages answers with its own twin
(``kapify.surgery.scripting``); any other host (the model itself when no single module reads the
input, e.g. RepVGG's two-branch stem) answers with a :class:`ScriptableStages`: its stages, then
the host without their hooks.
"""

from __future__ import annotations

import copy
import functools
from typing import List, Tuple

import torch
from torch import nn

__all__ = [
    "add_input_stage",
    "remove_input_stage",
    "input_stages",
    "hosted_stages",
    "move_input_stages",
    "ScriptableStages",
]

_PREPARE = "__prepare_scriptable__"


class ScriptableStages(nn.Module):
    """What ``torch.jit.script`` compiles for a host of input stages that has no twin of its own:
    the stages, then the host without their hooks (its parameters shared).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 2, 1))
        >>> add_input_stage(model, "scale", nn.Identity())
        >>> torch.jit.script(model).original_name
        'ScriptableStages'
    """

    def __init__(self, stages: List[nn.Module], module: nn.Module) -> None:
        super().__init__()
        self.stages = nn.Sequential(*stages)
        self.module = module

    def forward(self, x: torch.Tensor):  # the return type is the host's
        return self.module(self.stages(x))


def _run_stage(host: nn.Module, args: tuple, *, attr: str) -> tuple:
    stage = host.__dict__[attr]
    stage.train(host.training)
    return (stage(args[0]),) + tuple(args[1:])


def _is_stage_hook(hook: object) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _run_stage


def _hosted(host: nn.Module) -> List[Tuple[int, str]]:
    """(hook id, attr) of the input-stage hooks on ``host`` itself, in the order they run."""
    return [
        (hook_id, hook.keywords["attr"]) for hook_id, hook in host._forward_pre_hooks.items() if _is_stage_hook(hook)
    ]


def _scriptable_twin(host: nn.Module) -> nn.Module:
    """``host``'s answer to ``torch.jit.script``: a :class:`ScriptableStages` around a copy of it without the
    stage hooks."""
    attrs = [attr for _, attr in _hosted(host)]
    bare = copy.copy(host)  # its own attribute dict; parameters and submodules shared
    bare._forward_pre_hooks = type(host._forward_pre_hooks)(
        (hook_id, hook) for hook_id, hook in host._forward_pre_hooks.items() if not _is_stage_hook(hook)
    )
    for attr in [*attrs, _PREPARE]:
        bare.__dict__.pop(attr, None)
    twin = ScriptableStages([host.__dict__[attr] for attr in attrs], bare)
    # torch.jit.script keys its memo of prepared modules by id(): keep the host alive (in a tuple: not a submodule)
    twin.__dict__["_prepared_from"] = (host,)
    return twin.train(host.training)  # the stages follow the host's mode


def _sync_scriptable(host: nn.Module) -> None:
    """Give ``host`` the :func:`_scriptable_twin` answer while it hosts stages, unless its class has its own."""
    if hasattr(type(host), _PREPARE):
        return
    if _hosted(host):
        host.__dict__[_PREPARE] = functools.partial(_scriptable_twin, host)
    else:
        host.__dict__.pop(_PREPARE, None)


def _stage_hooks(model: nn.Module) -> List[Tuple[nn.Module, int, str]]:
    """(host module, hook id, attr) of every input-stage hook in ``model``, in the order they run."""
    return [(module, hook_id, attr) for module in model.modules() for hook_id, attr in _hosted(module)]


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
    hooks = _stage_hooks(model)
    host = hooks[0][0] if hooks else model  # where the existing stages run (moved or not)
    object.__setattr__(model, attr, stage)
    host.__dict__[attr] = stage
    host.register_forward_pre_hook(functools.partial(_run_stage, attr=attr), prepend=first)
    _sync_scriptable(host)


def move_input_stages(model: nn.Module, entry: str) -> None:
    """Run the input stages of ``model`` (in their order) on the input of its submodule ``entry``,
    the one module that consumes the raw input, instead of on the model's call.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> add_input_stage(model, "noise", nn.Identity())
        >>> move_input_stages(model, "0")
        >>> [type(host).__name__ for host, _, _ in _stage_hooks(model)]
        ['Linear']
    """
    target = model.get_submodule(entry)
    hooks = [(host, hook_id, attr) for host, hook_id, attr in _stage_hooks(model) if host is not target]
    for host, hook_id, attr in reversed(hooks):  # prepend in reverse: same order, before the entry's own hooks
        stage = host.__dict__[attr]
        del host._forward_pre_hooks[hook_id]
        if host is not model:
            host.__dict__.pop(attr)
        target.__dict__[attr] = stage
        target.register_forward_pre_hook(functools.partial(_run_stage, attr=attr), prepend=True)
    for host in {id(host): host for host, _, _ in hooks}.values():
        _sync_scriptable(host)
    _sync_scriptable(target)


def remove_input_stage(model: nn.Module, attr: str) -> None:
    """Remove the stage ``attr`` and its hook (no-op if absent)."""
    for host, hook_id, name in _stage_hooks(model):
        if name == attr:
            del host._forward_pre_hooks[hook_id]
            host.__dict__.pop(attr, None)
            _sync_scriptable(host)
    model.__dict__.pop(attr, None)


def input_stages(model: nn.Module) -> List[nn.Module]:
    """The stages of ``model``, in the order they run."""
    return [host.__dict__[attr] for host, _, attr in _stage_hooks(model)]


def hosted_stages(host: nn.Module) -> List[nn.Module]:
    """The stages whose hooks run on ``host`` itself (not on its submodules), in order."""
    return [host.__dict__[attr] for _, attr in _hosted(host)]
