"""One pass over a model's shaped FX graph that assigns every tensor's channel axis to groups.

Each tensor's channel axis belongs to a *channel group*: a conv/linear output starts a group; the
rules for each kind of node (:mod:`.node_rules` for functions and methods, :mod:`.module_rules`
for layers, whose channel handlers own what a layer does) say where an op puts the channels and which
groups must merge. A group touching anything the rules do not know (the model's input or output, an op
that is not channel-aware) is *fixed*: its width cannot change, and the reason names the node.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..config import require_module
from ..handlers import channel_handler
from ..tracing import check_graph, eval_mode, timm_settings, trace
from ..tracing import example_input as default_input
from . import module_rules, node_rules
from .axes import shape_of
from .context import ChannelAnalysis, Located, Step
from .graph import ChannelGraph, ChannelGroup

__all__ = ["analyze_channels", "channel_groups", "visit"]


def visit(an: ChannelAnalysis) -> ChannelGraph:
    """Run the rules over every node of ``an``'s graph, in order; the finished :class:`ChannelGraph`."""
    for node in an.gm.graph.nodes:
        args: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), args.append)
        step = Step(node, shape_of(node), args, an.lay(args[0]) if args else None, shape_of(args[0]) if args else None)
        if step.shape is not None and node.op in ("call_module", "call_function", "call_method"):
            paths = [p for p, _ in node.meta.get("nn_module_stack", {}).values()]
            for path in paths + [node.target] * (node.op == "call_module"):
                an.module_shapes[path] = tuple(step.shape)  # nodes come in execution order: the last is the output
        if (
            any(a in an.spread for a in args)
            and step.shape is not None
            and node.op != "output"
            and node_rules.through_flattened(an, step)
        ):
            continue
        an.layout[node] = _layout(an, node, step)
        an.check_width(node, step.shape)
    graph = an.groups.to_graph(an.inputs, an.outputs, an.roles, an.parameters, an.spreads, an.slices)
    graph.module_shapes = an.module_shapes
    return graph


def _layout(an: ChannelAnalysis, node: fx.Node, step: Step) -> Optional[Located]:
    if node.op == "placeholder":
        return an.fresh(node, "model input")
    if node.op == "get_attr":
        return an.parameter(node, step.shape)
    if node.op == "output":
        found: List[Optional[Located]] = []
        fx.node.map_arg(node.args, lambda n: found.append(an.layout.get(n)))
        an.fix_all(found, "model output")
        return None
    if node.op == "call_module":
        return module_rules.module_layout(an, step, an.gm.get_submodule(node.target))
    return node_rules.function_layout(an, step)


def analyze_channels(
    model: nn.Module, example_input: Optional[torch.Tensor] = None, leaf_modules: Iterable[type] = ()
) -> ChannelGraph:
    """Trace ``model`` and return its :class:`ChannelGraph`: which layers' channel counts must change together.

    Example:
        >>> import timm
        >>> graph = analyze_channels(timm.create_model("resnet18"), torch.rand(1, 3, 64, 64))
        >>> graph.group_of("layer1.0.conv2") is graph.group_of("conv1")  # joined by the residual add
        True
    """
    require_module(model)
    handled = {
        type(m) for m in model.modules() if channel_handler(m) is not None
    }  # e.g. timm's Linear: a leaf, not F.linear
    x = example_input if example_input is not None else default_input(model)
    return visit(ChannelAnalysis(_shaped_graph(model, tuple(leaf_modules) + tuple(handled), x), type(model), model))


def _shaped_graph(model: nn.Module, leaves: Tuple[type, ...], x: torch.Tensor) -> fx.GraphModule:
    """The traced graph with shapes. It first looks inside the blocks timm keeps whole for FX
    (NormFreeBlock: in-place ops), trusted only if it runs and matches eager; else timm's leaves."""

    def shaped(timm_leaves: bool) -> fx.GraphModule:
        gm = trace(model, leaves, timm_leaves=timm_leaves)
        with eval_mode(gm), torch.no_grad():
            ShapeProp(gm).propagate(x)
        return gm

    timm_blocks = tuple(timm_settings()[0])
    if any(isinstance(m, timm_blocks) and not isinstance(m, leaves) for m in model.modules()):
        try:
            gm = shaped(timm_leaves=False)
            if check_graph(gm, model, [x]) is None:
                return gm
        except Exception:  # noqa: BLE001 - any failure: use timm's own tracing settings
            pass
    return shaped(timm_leaves=True)


def channel_groups(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> List[ChannelGroup]:
    """The channel groups of ``model`` with their members, widths and whether they can change.

    Example:
        >>> import timm
        >>> groups = channel_groups(timm.create_model("resnet18"), torch.rand(1, 3, 64, 64))
        >>> g = next(g for g in groups if "layer1.0.conv2" in g.producers)
        >>> g.width, sorted(g.producers)[:2], g.fixed
        (64, ['conv1', 'layer1.0.conv2'], None)
    """
    return analyze_channels(model, example_input).groups
