"""Find every convolution a model runs, from its FX graph.

Convs called in the graph are found directly; convs inside leaf modules (blocks FX does not trace
through) are found by descending into those modules. Functional convolutions (``F.conv2d`` on a
raw weight outside any conv module) are reported: no module owns their output.
If the traced graph does not reproduce the eager model, it is not trusted and every conv module
of the model is taken instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv_types import is_conv
from .tracing import check_graph, eval_mode, example_input, trace

__all__ = ["ConvSites", "find_conv_sites"]

_FUNCTIONAL_CONVS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.convolution,
}


@dataclass
class ConvSites:
    """Conv modules to convert (name -> how it was found) and functional convs that cannot be;
    ``entry``: the one module that consumes the raw input, if the (trusted) graph shows one."""

    modules: Dict[str, str] = field(default_factory=dict)
    functional: List[str] = field(default_factory=list)
    graph_problem: Optional[str] = None
    entry: Optional[str] = None


def _reads_metadata(node: torch.fx.Node) -> bool:
    """``x.size()``, ``x.shape``, ``x.dim()``, ``len(x)``...: uses of a tensor that do not read its values."""
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function" and node.target in (getattr, len)
    )


def _input_entry(gm: torch.fx.GraphModule) -> Optional[str]:
    """The module that alone consumes the first input of ``gm`` (as its first argument, called once)."""
    placeholder = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    users = [] if placeholder is None else [u for u in placeholder.users if not _reads_metadata(u)]
    if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (placeholder,):
        return None
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == users[0].target]
    return users[0].target if len(calls) == 1 else None


def _scope(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return f"{node.name} in '{path or '<model>'}'"


def find_conv_sites(
    model: nn.Module,
    leaf_modules: Sequence[type] = (),
    inputs: Optional[Sequence[torch.Tensor]] = None,
    eager: Optional[object] = None,
) -> ConvSites:
    """Trace ``model`` (in eval mode), check the graph against eager (``eager``: the eval-mode output of
    ``model.forward`` on ``inputs``, if already run) and list its conv sites.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> find_conv_sites(net, inputs=[torch.randn(1, 3, 8, 8)]).modules
        {'0': 'graph', '2': 'graph'}
    """
    with eval_mode(model):  # trace the eval branches of `if self.training` code
        gm = trace(model, leaf_modules)
    sites = ConvSites()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if is_conv(module):
                sites.modules.setdefault(node.target, "graph")
                continue
            for sub_name, sub in module.named_modules():
                if sub_name and is_conv(sub):
                    sites.modules.setdefault(f"{node.target}.{sub_name}", f"inside leaf {type(module).__name__}")
        elif node.op == "call_function" and node.target in _FUNCTIONAL_CONVS:
            sites.functional.append(_scope(node))
    sites.graph_problem = check_graph(gm, model, inputs if inputs is not None else [example_input(model)], eager=eager)
    if sites.graph_problem is None:
        sites.entry = _input_entry(gm)
    else:
        warnings.warn(
            f"{type(model).__name__}: {sites.graph_problem}; the graph is not trusted, so every conv module "
            f"of the model is converted (module walk) instead of those the graph shows",
            stacklevel=3,
        )
        for name, module in model.named_modules():
            if is_conv(module):
                sites.modules.setdefault(name, "module walk")
    return sites
