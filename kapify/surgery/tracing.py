"""The one FX tracer kapify uses to look at a model's graph.

It applies timm's tracing settings (timm's leaf modules and auto-wrapped functions, as
``timm.layers.create_feature_extractor`` passes them to torchvision's feature-extraction tracer),
keeps every registered conv type as a leaf (its output *is* the conv's output) and adds the leaf
modules registered with :func:`register_leaf_module`. A traced graph is only trusted after
:func:`check_graph` has compared it with eager execution.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Type

import torch
import torch.fx as fx
from torch import nn

from .conv_types import conv_types
from .registry import Registry

__all__ = [
    "KapifyTracer", "TracingError", "register_leaf_module", "trace", "check_graph", "eval_mode", "example_input",
    "example_input_shape",
]  # fmt: skip

#: module classes FX does not trace through (besides timm's own and a call's leaf_modules)
LEAF_MODULES: Registry[Type[nn.Module]] = Registry("leaf module")


def register_leaf_module(cls: Type[nn.Module], reason: str = "") -> Type[nn.Module]:
    """Treat ``cls`` as a leaf when tracing: FX does not trace through its ``forward``.

    Use it for blocks with data-dependent control flow. Convolutions inside a leaf are still
    converted. Usable as a decorator.

    Example:
        >>> @register_leaf_module
        ... class Dynamic(nn.Module):
        ...     def forward(self, x):
        ...         return x if x.sum() > 0 else -x
    """
    LEAF_MODULES.add(cls, cls, reason)
    return cls


class TracingError(RuntimeError):
    """The model could not be traced by torch.fx; the message names the module where it failed."""


def timm_settings() -> Tuple[List[type], List[Callable]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


class KapifyTracer(fx.Tracer):
    """``torch.fx.Tracer`` with timm's leaf settings, conv types as leaves, and the module path of a failure."""

    def __init__(self, leaf_modules: Sequence[type] = (), timm_leaves: bool = True) -> None:
        timm_modules, timm_functions = timm_settings()
        super().__init__(autowrap_functions=tuple(f for f in timm_functions if callable(f)))
        self.leaf_types = tuple({*(timm_modules if timm_leaves else ()), *LEAF_MODULES.keys(), *leaf_modules})
        self._stack: List[Tuple[str, type]] = []
        self.failed_in: Optional[Tuple[str, type]] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, conv_types()) or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Any:
        self._stack.append((self.path_of_module(m), type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._stack[-1]
            raise
        finally:
            self._stack.pop()


def trace(model: nn.Module, leaf_modules: Sequence[type] = (), timm_leaves: bool = True) -> fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TracingError` naming the failing module.
    ``timm_leaves=False`` traces into the blocks timm keeps whole (for analyses that only need shapes).

    Example:
        >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    tracer = KapifyTracer(leaf_modules, timm_leaves)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(model)
    except Exception as err:
        where = "the model's own forward"
        cls_name = type(model).__name__
        if tracer.failed_in is not None:
            path, cls = tracer.failed_in
            where, cls_name = f"module '{path}'", cls.__name__
        raise TracingError(
            f"torch.fx could not trace {type(model).__name__}: it failed inside {where} ({cls_name}) with "
            f"{type(err).__name__}: {err}. Mark that block as a leaf so FX does not trace through it, e.g. "
            f"`kapify.register_leaf_module({cls_name})` or `convert(..., leaf_modules=[{cls_name}])`; "
            f"convolutions inside a leaf are still converted."
        ) from err
    return fx.GraphModule(model, graph, class_name=type(model).__name__ + "Graph")


def example_input_shape(model: nn.Module) -> Tuple[int, ...]:
    """The shape of one input for ``model``, without the batch: timm's ``pretrained_cfg['input_size']`` if present,
    else shaped for the first convolution (3x224x224 for torchvision-style image models)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    first = next((m for m in model.modules() if isinstance(m, conv_types())), None)
    if first is None:
        raise ValueError("cannot guess an input for a model without convolutions; pass example_input")
    if not hasattr(first, "kernel_size"):
        raise ValueError(
            f"cannot guess an input for {type(model).__name__}: its first conv ({type(first).__name__}) has no "
            f"kernel_size to tell 1-D from 2-D; pass example_input"
        )
    ndim = len(first.kernel_size)
    return (first.in_channels, *([224 if ndim == 2 else 32] * ndim))


def example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    """A random input for ``model`` of :func:`example_input_shape`, on its device and in its float dtype."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(batch_size, *example_input_shape(model), device=device, dtype=dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, then restore every submodule's own train/eval flag."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def _flatten(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def check_graph(
    gm: fx.GraphModule,
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    atol: float = 1e-4,
    eager: Optional[object] = None,
) -> Optional[str]:
    """Run ``gm`` and ``model.forward`` (the traced code: the model's own pre-hooks, such as input
    normalisation, are not part of the graph) in eval mode on ``inputs``; return why they differ,
    or None if equal. ``eager``: what ``model.forward`` returned on ``inputs``, when already run."""
    with eval_mode(model), torch.no_grad():
        try:
            want = _flatten(model.forward(*inputs) if eager is None else eager)
        except Exception as err:
            return f"the eager model failed on the example input: {type(err).__name__}: {err}"
        try:
            got = _flatten(gm(*inputs))
        except Exception as err:
            return f"the traced graph fails at run time: {type(err).__name__}: {err}"
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return "the traced graph returns outputs of other shapes than the eager model"
    for g, w in zip(got, want):
        scale = w.abs().max().item() if w.numel() else 0.0
        if not torch.allclose(g, w, atol=atol * max(1.0, scale), rtol=1e-3):
            return "the traced graph's output differs from the eager model's"
    return None
