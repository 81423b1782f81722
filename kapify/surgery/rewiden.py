"""``kapify.rewiden``: change channel widths consistently across the whole graph by a width rule.

Three steps apart: the channel analysis (:mod:`.channels`) builds the graph, :func:`~.width_plan.plan_widths`
reads it into a plan (plain data), and :func:`apply_layout` rewrites the layers; :func:`widen` composes them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .channels import ChannelGraph, ChannelGroup, SliceSite, StoredSizes, analyze_channels, block_handler
from .conv_types import is_conv
from .handlers import resize_layer, resize_parameter
from .squares import MAX_GROWTH, square_width
from .tracing import eval_mode
from .tracing import example_input as default_input
from .width_plan import WidthFn, WidthPlan, plan_widths

__all__ = [
    "RewidenError",
    "Widened",
    "apply_layout",
    "rewiden",
    "square_width",
    "widen",
    "width_mult",
    "WIDTH_RULES",
    "resolve_width_rule",
    "replay_widths",
    "width_record",
]


def width_mult(m: float) -> WidthFn:
    """The width rule ``C -> round(m * C)`` (the paper's RN18WideX4 is ``width_mult(4)``)."""
    if not m >= 1:
        raise ValueError(f"width_mult must be >= 1 (re-widening never shrinks), got {m}")
    return lambda c: max(c, int(round(m * c)))


#: named width rules (recorded in checkpoints, so kapify.load can replay them).
def _square_rule(align: int = 16) -> WidthFn:
    def rule(channels: int, divisor: int = 1, max_growth: int = MAX_GROWTH) -> int:
        return square_width(channels, align, divisor, max_growth)

    rule.takes_divisor = True  # type: ignore[attr-defined]
    return rule


WIDTH_RULES: Dict[str, Callable[..., WidthFn]] = {
    "square": _square_rule,  # next usable perfect square (a multiple of the group width for grouped convs)
    "mult": lambda m: width_mult(m),  # m x wider
}


def resolve_width_rule(rule: Union[str, Dict, WidthFn]) -> WidthFn:
    if callable(rule):
        return rule
    if isinstance(rule, str):
        rule = {"name": rule}
    options = {k: v for k, v in rule.items() if k != "name"}
    if rule.get("name") not in WIDTH_RULES:
        raise ValueError(f"unknown width rule {rule!r}; named rules: {sorted(WIDTH_RULES)} or a callable C -> C'")
    return WIDTH_RULES[rule["name"]](**options)


def rewiden(
    model: nn.Module,
    width_fn: Union[str, Dict, WidthFn] = "square",
    function_preserving: bool = False,
    example_input: Optional[torch.Tensor] = None,
    leaf_modules: Iterable[type] = (),
    strict: bool = False,
) -> nn.Module:
    """Return a copy of ``model`` whose channel groups (see :func:`kapify.channel_groups`) have
    ``width_fn(C)`` channels, every member rewritten consistently (convs, BatchNorm, depthwise
    groups, residual adds, concat slices, heads). Groups that cannot change (model input/output,
    ops that are not channel-aware) keep their width. Old channels keep their trained values; new
    ones get the layer's own initialisation; with ``function_preserving=True`` the outgoing weights
    of new channels start at zero, so the widened model computes what the original did.

    ``width_fn``: a callable ``C -> C' >= C``, ``"square"`` (:func:`square_width`) or
    ``{"name": "mult", "m": 4}``. ``strict=True`` raises (naming the layers and why) if any conv's
    channel group cannot change. The caller's model is never modified.

    Example:
        >>> import timm
        >>> wide = rewiden(timm.create_model("resnet18"), "square", example_input=torch.rand(1, 3, 64, 64))
        >>> wide.layer2[0].conv1.out_channels, wide.fc.in_features, wide.fc.out_features
        (144, 576, 1000)
    """
    return widen(model, width_fn, function_preserving, example_input, leaf_modules, strict).model


Checked = Tuple[torch.Tensor, object]  # an input the widened model ran on in eval mode, and what its forward returned


@dataclass
class Widened:
    """A re-widened copy of a model, with what decided it: the channel graph of the original, the width plan,
    and the input the widened model ran on with its output (convert checks its trace against that run)."""

    model: nn.Module
    graph: ChannelGraph
    plan: WidthPlan
    checked: Checked


def widen(
    model: nn.Module,
    width_fn: Union[str, Dict, WidthFn] = "square",
    function_preserving: bool = False,
    example_input: Optional[torch.Tensor] = None,
    leaf_modules: Iterable[type] = (),
    strict: bool = False,
    widen_normalised: bool = False,
) -> Widened:
    """:func:`rewiden` in its three steps: analyse (the channel graph), plan (:func:`plan_widths`), apply
    (:func:`apply_layout`), then one eval-mode run of the widened model. ``widen_normalised``: with
    ``function_preserving``, widen channel-normalised groups too (new channels get zero outgoing
    weights but enter the LayerNorm/GroupNorm statistics, so the function is only nearly kept)."""
    fn = resolve_width_rule(width_fn)
    new = copy.deepcopy(model)
    graph = analyze_channels(new, example_input, leaf_modules)
    stuck = [g for g in graph.groups if g.fixed is not None and g.producers and g.fixed != "model output"]
    if strict and stuck:
        raise ValueError(
            f"{len(stuck)} channel group(s) cannot be re-widened: "
            + "; ".join(f"{', '.join(g.producers[:3])}: {g.fixed}" for g in stuck[:5])
            + ". Register a channel handler (kapify.register_channel_handler) or a leaf module for these layers, or "
            "pass strict=False"
        )
    convs = [n for n in graph.conv_outputs() if is_conv(new.get_submodule(n))]
    plan = plan_widths(graph, fn, function_preserving, widen_normalised, convs)
    apply_layout(new, graph, plan.widths, plan.index, function_preserving)
    _sync_head_width(new, _reads(model.get_classifier()) if hasattr(model, "get_classifier") else None)
    x = example_input if example_input is not None else default_input(new)
    entries = _feature_modules(new)
    shapes, output = _check_forward(new, x, [e["module"] for e in entries])
    _sync_feature_info(graph.module_shapes, entries, shapes)
    return Widened(new, graph, plan, (x, output))


def width_record(widened: Widened) -> Dict[str, Any]:
    """What :func:`replay_widths` needs to widen a fresh copy of the model again without tracing it, as JSON:
    each group's old and new width, the old channels' new positions where they moved (merged groups), each
    member's layouts, the stored sizes block handlers rewrite, and timm's new ``feature_info`` widths."""
    graph, plan = widened.graph, widened.plan
    moved = {g: idx for g, idx in plan.index.items() if not torch.equal(idx, torch.arange(graph.groups[g].width))}

    def layouts(table: Dict[str, Tuple[int, ...]]) -> Dict[str, List[int]]:
        return {name: list(layout) for name, layout in table.items()}

    return {
        "old": [g.width for g in graph.groups],
        "new": [plan.widths[g.id] for g in graph.groups],
        "index": {str(g): idx.tolist() for g, idx in moved.items()},
        "inputs": layouts(graph.inputs),
        "outputs": layouts(graph.outputs),
        "channelwise": layouts(graph.channelwise),
        "parameters": {path: [dim, list(layout)] for path, (dim, layout) in graph.parameters.items()},
        "spread": dict(graph.spread),
        "slices": [[s.owner, [[at, list(prefix)] for at, prefix in s.boundaries]] for s in graph.slices],
        "feature_info": [entry["num_chs"] for entry in _feature_modules(widened.model)],
    }


def replay_widths(model: nn.Module, record: Dict[str, Any], inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace``) re-widened as :func:`width_record` recorded it (no
    tracing, no forward run)."""
    old_classifier = _reads(model.get_classifier()) if hasattr(model, "get_classifier") else None
    new = model if inplace else copy.deepcopy(model)
    graph = ChannelGraph(
        groups=[ChannelGroup(i, width) for i, width in enumerate(record["old"])],
        inputs={name: tuple(layout) for name, layout in record["inputs"].items()},
        outputs={name: tuple(layout) for name, layout in record["outputs"].items()},
        channelwise={name: tuple(layout) for name, layout in record["channelwise"].items()},
        parameters={path: (dim, tuple(layout)) for path, (dim, layout) in record["parameters"].items()},
        spread=dict(record["spread"]),
        slices=[SliceSite(owner, [(at, tuple(prefix)) for at, prefix in bounds]) for owner, bounds in record["slices"]],
    )
    index = {g: torch.arange(width) for g, width in enumerate(record["old"])}
    index.update({int(g): torch.tensor(idx) for g, idx in record["index"].items()})
    apply_layout(new, graph, dict(enumerate(record["new"])), index, zero_new_inputs=True)
    _sync_head_width(new, old_classifier)
    for entry, channels in zip(_feature_modules(new), record["feature_info"]):
        entry["num_chs"] = channels
    return new


def apply_layout(
    model: nn.Module,
    graph: ChannelGraph,
    widths: Dict[int, int],
    index: Dict[int, torch.Tensor],
    zero_new_inputs: bool = False,
) -> None:
    """Rewrite every member of every group of ``graph`` in place: group g gets ``widths[g]`` channels
    and its old channel i moves to position ``index[g][i]`` (new positions start fresh, with zero
    outgoing weights when ``zero_new_inputs``). Shared by :func:`rewiden` (wider groups) and
    :func:`kapify.surgery.arrange.arrange_channels` (same widths, permuted)."""

    def layout_map(layout) -> tuple[int, torch.Tensor]:
        offset, parts = 0, []
        for gid in layout:
            parts.append(index[gid] + offset)
            offset += widths[gid]
        return offset, torch.cat(parts)

    names = set(graph.inputs) | set(graph.outputs) | set(graph.channelwise)
    for name in sorted(names):
        module = model.get_submodule(name)
        if name in graph.channelwise:
            size, idx = layout_map(graph.channelwise[name])
            resize_layer(
                module, new_in=size, in_index=idx, new_out=size, out_index=idx, zero_new_inputs=zero_new_inputs
            )
            continue
        kwargs = {}
        if name in graph.inputs:
            size, idx = layout_map(graph.inputs[name])
            if name in graph.spread:  # a classifier reading flattened (C, H, W): channel c owns entries c*k .. c*k+k-1
                k = graph.spread[name]
                size, idx = size * k, (idx[:, None] * k + torch.arange(k)).flatten()
            kwargs.update(new_in=size, in_index=idx, zero_new_inputs=zero_new_inputs)
        if name in graph.outputs:
            size, idx = layout_map(graph.outputs[name])
            kwargs.update(new_out=size, out_index=idx)
        resize_layer(module, **kwargs)
    for path, (dim, layout) in graph.parameters.items():  # e.g. LayerScale's gamma
        size, idx = layout_map(layout)
        if size == sum(len(index[gid]) for gid in layout) and torch.equal(idx, torch.arange(size)):
            continue  # unchanged; it may be a tensor constant of the traced graph that the plain model lacks
        owner_name, _, attr = path.rpartition(".")
        resize_parameter(model.get_submodule(owner_name), attr, dim, size, idx)
    _rewrite_stored_sizes(model, graph, widths)


def _rewrite_stored_sizes(model: nn.Module, graph: ChannelGraph, widths: Dict[int, int]) -> None:
    """Each block with splits at stored sizes gets its new offsets through its block handler."""
    offsets: Dict[str, Dict[int, set]] = {}
    for site in graph.slices:
        for old, prefix in site.boundaries:
            offsets.setdefault(site.owner, {}).setdefault(old, set()).add(sum(widths[g] for g in prefix))
    for owner, moved in offsets.items():
        if all(new == {old} for old, new in moved.items()):
            continue
        block = model.get_submodule(owner)
        try:
            block_handler(type(block))(block, StoredSizes(owner, moved))
        except (KeyError, ValueError) as err:
            raise RewidenError(f"the block handler of '{owner}' ({type(block).__name__}) failed: {err}") from err


class RewidenError(ValueError):
    """The widened model no longer runs: it hard-codes a channel count the graph does not show."""


def _output_shapes(model: nn.Module, x: torch.Tensor, names: Iterable[str]) -> Tuple[Dict[str, torch.Size], object]:
    """One eval-mode run of ``model.forward`` on ``x`` (the traced code: not the model's own hooks): the output
    shape of each named submodule, and the output."""
    seen: Dict[str, torch.Size] = {}

    def record(key: str) -> Callable:
        def hook(module: nn.Module, inputs: object, output: object) -> None:  # returns None: the output is kept
            if isinstance(output, torch.Tensor):
                seen.setdefault(key, output.shape)

        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    try:
        with eval_mode(model), torch.no_grad():
            output = model.forward(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, output


def _check_forward(
    model: nn.Module, x: torch.Tensor, names: Iterable[str] = ()
) -> Tuple[Dict[str, torch.Size], object]:
    """Run the widened model once (it must still work): the output shapes of ``names``, and its output."""
    try:
        return _output_shapes(model, x, names)
    except Exception as err:
        raise RewidenError(
            f"re-widening broke the model's forward ({type(err).__name__}: {str(err).splitlines()[0][:200]}): a layer "
            f"hard-codes a channel count the traced graph does not show (e.g. a view to a stored width). Use "
            f"grid='rect' / no re-widening for this model, or register a channel handler or leaf module for that layer"
        ) from err


def _reads(classifier: nn.Module) -> Optional[int]:
    """The input width of a classifier: a Linear or a 1x1 conv head (DLA, ResNetV2)."""
    if isinstance(classifier, nn.Linear):
        return classifier.in_features
    return getattr(classifier, "in_channels", None) if isinstance(classifier, nn.modules.conv._ConvNd) else None


def _sync_head_width(new: nn.Module, before: Optional[int]) -> None:
    """timm models remember their feature width (``num_features``, ``head_hidden_size``) for
    ``reset_classifier`` and ``forward_head``: keep it equal to what the classifier now reads (``before``: what it
    read before re-widening)."""
    if not hasattr(new, "get_classifier") or not hasattr(new, "num_features"):
        return
    after = _reads(new.get_classifier())
    if before is not None and after is not None and before != after:
        for attr in ("num_features", "head_hidden_size", "embed_dim"):  # ViTs rebuild their head from embed_dim
            if getattr(new, attr, None) == before:
                setattr(new, attr, after)
        for module in new.modules():  # timm's head modules (ClassifierHead, NormMlpClassifierHead) store it too
            if type(module).__name__.endswith("Head"):
                for attr in ("in_features", "num_features"):
                    if getattr(module, attr, None) == before:
                        setattr(module, attr, after)


def _feature_modules(model: nn.Module) -> List[Dict]:
    """timm's ``feature_info`` entries whose module exists (each has ``module`` and ``num_chs``)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not all(isinstance(i, dict) and "module" in i and "num_chs" in i for i in info):
        return []
    names = dict(model.named_modules())
    return [entry for entry in info if entry["module"] in names]


def _sync_feature_info(before: Dict[str, Tuple[int, ...]], entries: List[Dict], after: Dict[str, torch.Size]) -> None:
    """timm's ``feature_info`` lists each feature stage's width (``num_chs``): after widening, read
    the new width off the stage's output (``after``), on the dim where the old output (``before``, from
    the traced run) had the old width."""
    for entry in entries:
        old_shape, new_shape = before.get(entry["module"]), after.get(entry["module"])
        if old_shape is None or new_shape is None or len(old_shape) != len(new_shape):
            continue
        dims = [d for d in (1, len(old_shape) - 1) if old_shape[d] == entry["num_chs"]]
        if dims:
            entry["num_chs"] = int(new_shape[dims[0]])
