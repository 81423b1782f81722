"""``kapify.rewiden``: change channel widths consistently across the whole graph by a width rule."""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .channels import ChannelGraph, StoredSizes, analyze_channels, block_handler
from .conv_types import is_conv
from .regroup import merged_index, merged_square
from .resize import resize_layer, resize_parameter
from .squares import MAX_GROWTH, MAX_GROWTH_GROUPED, square_width
from .tracing import eval_mode
from .tracing import example_input as default_input

__all__ = ["RewidenError", "apply_layout", "rewiden", "square_width", "width_mult", "WIDTH_RULES", "resolve_width_rule"]

WidthFn = Callable[[int], int]


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


def _plan(
    graph: ChannelGraph, width_fn: WidthFn, function_preserving: bool, widen_normalised: bool, convs: Iterable[str] = ()
) -> Tuple[Dict[int, int], Dict[int, int]]:
    """Each group's new width, and the output groups of grouped convs that merge their groups (-> the new number
    of groups). ``convs``: the conv layers (KAP pools them), whose outputs the square rule makes square."""
    widths: Dict[int, int] = {}
    growth = _growth_limits(graph)
    for g in graph.groups:
        if function_preserving and not widen_normalised and g.normalised and g.fixed is None:
            g.fixed = (
                "a GroupNorm/LayerNorm normalises across these channels (or attention scales by their count): "
                "new ones would change the function"
            )
        if g.fixed is not None or not g.producers:
            widths[g.id] = g.width
            continue
        new = (
            width_fn(g.width, divisor=g.divisor, max_growth=growth((g.id,)))
            if getattr(width_fn, "takes_divisor", False)
            else width_fn(g.width)
        )
        if not isinstance(new, int) or isinstance(new, bool):
            raise ValueError(f"the width rule returned {new!r} for {g.width} channels; it must return an int")
        if new < g.width:
            raise ValueError(
                f"the width rule shrinks {g.width} channels to {new} (group of {g.producers[0]}); re-widening only "
                f"grows"
            )
        if new % g.divisor:
            new = -(-new // g.divisor) * g.divisor  # grouped convs: round up to a multiple of the groups
        widths[g.id] = new
    _derive_multiplied(graph, widths)
    units = _tie_units(graph, widths)
    if getattr(width_fn, "takes_divisor", False):  # the square rule: make split convs' whole outputs square too
        _square_split_outputs(graph, widths, units, width_fn, set(convs), growth)
    _keep_leading_pieces_widest(graph, widths)
    merged: Dict[int, int] = {}
    _derive_multiplied(
        graph, widths, merged if getattr(width_fn, "takes_divisor", False) else None
    )  # again, from inputs those steps grew
    return widths, merged


def _growth_limits(graph: ChannelGraph) -> Callable[[Iterable[int]], int]:
    """How much groups may grow to reach a square: :data:`MAX_GROWTH_GROUPED` where a grouped or depthwise conv pools
    one of them or, with a depth multiplier, sets its width from them (spare filters cannot stand in there), else
    :data:`MAX_GROWTH`."""
    multiplied = {
        g for out in graph.depth_multiplied for g in (out, graph.multiplied[out][0]) if out in graph.multiplied
    }
    grouped = {g for name in graph.grouped for g in graph.channelwise[name]} | multiplied
    return lambda groups: MAX_GROWTH_GROUPED if grouped.intersection(groups) else MAX_GROWTH


def _derive_multiplied(graph: ChannelGraph, widths: Dict[int, int], merged: Optional[Dict[int, int]] = None) -> None:
    """Grouped convs with a depth multiplier, attention heads: the output width follows the input's. With
    ``merged`` (the square rule), a grouped conv whose output would not be square merges its groups to make it
    square where :func:`~kapify.surgery.regroup.merged_square` finds a way (out group -> its number of groups)."""
    ties = {g for tie in graph.ties for g in tie}
    for out, (inp, per_in, per_out) in graph.multiplied.items():
        if graph.groups[out].fixed is not None:
            continue
        widths[out] = widths[inp] // per_in * per_out
        if (
            merged is not None
            and out in graph.depth_multiplied
            and graph.groups[out].divisor == 1
            and out not in ties
            and math.isqrt(widths[out]) ** 2 != widths[out]
        ):
            found = merged_square(widths[inp], per_in, per_out)
            if found is not None:
                widths[out], merged[out] = found


def _merged_layouts(
    graph: ChannelGraph, widths: Dict[int, int], merged: Dict[int, int], index: Dict[int, torch.Tensor]
) -> None:
    """The new positions of the old output channels of grouped convs that merge their groups (in graph order: one's
    input may be another's output)."""
    for out, groups in merged.items():
        inp, per_in, per_out = graph.multiplied[out]
        index[out] = merged_index(index[inp], per_in, per_out, widths[inp] // groups, widths[out] // groups)


def _tie_units(graph: ChannelGraph, widths: Dict[int, int]) -> Dict[int, Tuple[int, ...]]:
    """Groups that must keep one width (pieces of an equal split) get the widest planned width, or all
    keep theirs when one cannot change. Returns each group's unit (the groups tied to it, itself included)."""
    units = {g.id: (g.id,) for g in graph.groups}
    parent = {g.id: g.id for g in graph.groups}

    def find(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    for tie in graph.ties:
        for other in tie[1:]:
            parent[find(other)] = find(tie[0])
    classes: Dict[int, List[int]] = {}
    for g in parent:
        classes.setdefault(find(g), []).append(g)
    for members in (m for m in classes.values() if len(m) > 1):
        stuck = [graph.groups[g] for g in members if graph.groups[g].fixed is not None or not graph.groups[g].producers]
        for g in members:
            units[g] = tuple(members)
            if stuck:
                widths[g] = graph.groups[g].width
                graph.groups[g].fixed = (
                    graph.groups[g].fixed or f"split into pieces of one width with channels that stay: {stuck[0].fixed}"
                )
            else:
                widths[g] = max(widths[m] for m in members)
    return units


def _square_split_outputs(
    graph: ChannelGraph,
    widths: Dict[int, int],
    units: Dict[int, Tuple[int, ...]],
    width_fn: WidthFn,
    convs: set,
    growth: Callable[[Iterable[int]], int],
) -> None:
    """A conv whose output is later split (CSPNet, Res2Net, DPN) has several segments; where one of them
    (or one tied set) is no conv's whole output, size it so that the conv's total is a square too."""
    outputs = {name: layout for name, layout in graph.conv_outputs().items() if name in convs}
    whole = {layout[0] for layout in outputs.values() if len(layout) == 1}
    caps = {
        site.pieces[-1][0]: site.pieces[0]
        for site in graph.slices  # x.split(size): the last piece is no wider
        if site.kind == "leading" and len(site.pieces) > 1 and len(site.pieces[-1]) == 1
    }
    locked: set = set()

    def free_units(layout: Tuple[int, ...]) -> List[Tuple[int, ...]]:
        return [
            units[g]
            for g in layout
            if not (set(units[g]) & (whole | locked)) and graph.groups[g].fixed is None and graph.groups[g].producers
        ]

    # the outputs with the fewest free segments first (SHViT: q, k, v with only v free, before the stream v is cut from)
    for layout in sorted(outputs.values(), key=lambda lo: len(free_units(lo))):
        if len(layout) < 2:
            continue
        free = free_units(layout)
        if not any(_square_total(graph, widths, layout, unit, width_fn, caps, growth) for unit in free):
            _grow_whole_segment(graph, widths, layout, free, units, whole - locked, width_fn, caps, growth)
        locked.update(layout)


def _grow_whole_segment(
    graph: ChannelGraph,
    widths: Dict[int, int],
    layout: Tuple[int, ...],
    free: List[Tuple[int, ...]],
    units: Dict[int, Tuple[int, ...]],
    grown: set,
    width_fn: WidthFn,
    caps: Dict[int, Tuple[int, ...]],
    growth: Callable[[Iterable[int]], int],
) -> None:
    """No free segment squares the total alone (CS3Darknet: 36 + at most 36 has no square): try the next
    squares (up to two) for a segment that is a conv's whole output (with the pieces tied to it), then the free ones
    again."""
    for unit in dict.fromkeys(units[g] for g in layout if g in grown):
        if any(graph.groups[g].fixed is not None or g not in grown for g in unit):
            continue
        old = widths[unit[0]]
        divisor = math.lcm(*(graph.groups[g].divisor for g in unit))
        for _ in range(2):
            for g in unit:
                widths[g] = width_fn(widths[g] + 1, divisor=divisor, max_growth=growth(unit))
            if any(_square_total(graph, widths, layout, free_unit, width_fn, caps, growth) for free_unit in free):
                return
        for g in unit:
            widths[g] = old


def _square_total(
    graph: ChannelGraph,
    widths: Dict[int, int],
    layout: Tuple[int, ...],
    unit: Tuple[int, ...],
    width_fn: WidthFn,
    caps: Dict[int, Tuple[int, ...]],
    growth: Callable[[Iterable[int]], int],
) -> bool:
    """Give ``unit``'s groups the least width (from their old one) that makes ``layout``'s total a square the
    width rule would pick (a multiple of 16 from 64 on), or any square if that one is over twice as wide
    (RegNet-128GF's 11 groups of 264: 11 x 275 = 3025, not 11 x 704 = 7744)."""
    count = sum(layout.count(g) for g in unit)
    others = sum(widths[g] for g in layout if g not in unit)
    old = graph.groups[unit[0]].width
    step = math.lcm(*(graph.groups[g].divisor for g in unit))
    cap = min(
        (sum(widths[p] for p in caps[g]) for g in unit if g in caps), default=growth(layout) * (others + count * old)
    )

    def least(square: Callable[[int], bool]) -> Optional[int]:
        return next((w for w in range(old, cap + 1, step) if square(others + count * w)), None)

    ruled, plain = least(lambda t: width_fn(t, divisor=1) == t), least(lambda t: math.isqrt(t) ** 2 == t)
    width = (
        ruled
        if ruled is not None and (plain is None or count * ruled + others <= 2 * (count * plain + others))
        else plain
    )
    if width is None:
        return False
    for g in unit:
        widths[g] = width
    return True


def _keep_leading_pieces_widest(graph: ChannelGraph, widths: Dict[int, int]) -> None:
    """``x.split(size)`` makes pieces of ``size`` and a last one no wider: widen the leading pieces' last segment if
    needed."""
    for site in graph.slices:
        if site.kind != "leading" or len(site.pieces) < 2:
            continue
        lead, last = (sum(widths[g] for g in site.pieces[i]) for i in (0, -1))
        if last > lead:
            for piece in site.pieces[:-1]:
                g = piece[-1]
                widths[g] += -(-(last - lead) // graph.groups[g].divisor) * graph.groups[g].divisor


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
    return _rewiden(model, width_fn, function_preserving, example_input, leaf_modules, strict)[0]


Checked = Tuple[torch.Tensor, object]  # an input the widened model ran on in eval mode, and what its forward returned


def _rewiden(
    model: nn.Module,
    width_fn: Union[str, Dict, WidthFn],
    function_preserving: bool,
    example_input: Optional[torch.Tensor],
    leaf_modules: Iterable[type],
    strict: bool,
    widen_normalised: bool = False,
) -> Tuple[nn.Module, ChannelGraph, Checked]:
    """:func:`rewiden`, also returning the channel graph (for reports) and the forward that checked the widened
    model (convert compares its traced graph to it instead of running it again). ``widen_normalised``: with
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
    widths, merged = _plan(
        graph,
        fn,
        function_preserving,
        widen_normalised,
        [n for n in graph.conv_outputs() if is_conv(new.get_submodule(n))],
    )
    index = {g.id: torch.arange(g.width) for g in graph.groups}  # old channels first; grouped convs gain whole groups
    _merged_layouts(graph, widths, merged, index)
    apply_layout(new, graph, widths, index, function_preserving)
    _sync_head_width(model, new)
    x = example_input if example_input is not None else default_input(new)
    entries = _feature_modules(new)
    shapes, output = _check_forward(new, x, [e["module"] for e in entries])
    _sync_feature_info(graph.module_shapes, entries, shapes)
    return new, graph, (x, output)


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
    for path, (dim, layout) in graph.parameters.items():
        size, idx = layout_map(layout)
        owner_name, _, attr = path.rpartition(".")
        owner = model.get_submodule(owner_name)
        if getattr(owner, attr).shape[dim] != size or not torch.equal(
            idx, torch.arange(size)
        ):  # e.g. LayerScale's gamma
            resize_parameter(owner, attr, dim, size, idx)
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


def _sync_head_width(old: nn.Module, new: nn.Module) -> None:
    """timm models remember their feature width (``num_features``, ``head_hidden_size``) for
    ``reset_classifier`` and ``forward_head``: keep it equal to what the classifier now reads."""
    if not hasattr(new, "get_classifier") or not hasattr(new, "num_features"):
        return
    before, after = _reads(old.get_classifier()), _reads(new.get_classifier())
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
