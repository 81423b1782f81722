"""How the channel analysis reads each kind of layer: the layout rules that handlers name by ``layout_rule``.

A channel handler (:mod:`kapify.surgery.handlers`) says where a layer keeps its channel counts and how to resize
it; its ``layout_rule`` names one of :data:`LAYOUT_RULES` here, which records what the layer does to the groups
of channels it reads (a new group, the same one, whole units of it) and returns its output's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from torch import nn

from ..handlers import ChannelHandler
from ..squares import MAX_GROWTH_GROUPED, aligned_square
from .context import ChannelAnalysis, Located, Step
from .graph import Layout

__all__ = ["LAYOUT_RULES", "LayoutRule", "layout_rule", "weight_layout", "whole_units"]

#: (analysis, step, layer name, layer, its handler, input layout) -> output layout (None: recorded as pieces)
LayerLayout = Callable[[ChannelAnalysis, Step, str, nn.Module, ChannelHandler, Located], Optional[Located]]


def whole_units(an: ChannelAnalysis, name: str, layout: Layout, width: int, what: str, units: str) -> None:
    """Widening adds whole units of ``width`` channels (a grouped conv's groups, attention heads) to each segment."""
    if any(an.groups.width[g] % width for g in layout):  # a segment boundary inside a unit
        an.fix_all([(0, layout)], f"{what} '{name}' reads segments that cut its {units} of {width}")
    for g in layout:
        an.groups.restrict(g, width)


def weight_layout(
    an: ChannelAnalysis, step: Step, name: str, module: nn.Module, handler: ChannelHandler, src: Located
) -> Optional[Located]:
    """A conv/linear (module ``name``, called as a layer or through its weight) starts a new group; a
    depthwise/grouped conv with equal in and out channels carries its input's."""
    node, axis = step.node, src[0]
    groups = getattr(module, "groups", 1)
    c_in, c_out = handler.count(module, handler.in_attr), handler.count(module, handler.out_attr)
    if groups > 1 and c_in == c_out:  # depthwise / grouped: channel i in feeds group of channel i out
        width = c_in // groups
        if (
            width > 1
            and src is step.src
            and len(src[1]) == 1
            and aligned_square(c_in, divisor=width, max_growth=MAX_GROWTH_GROUPED) is None
        ):
            # no square within MAX_GROWTH_GROUPED x is a whole number of groups (RegNet's 3 groups of 56): keep the
            # count, widen each
            piece = an.equal_pieces(step, groups)
            if piece is not None:
                an.role(name, "grouped", piece * groups)
                return axis, piece * groups
        whole_units(an, name, src[1], width, "grouped conv", "groups")
        an.role(name, "grouped", src[1])
        return src
    if groups > 1 and len(src[1]) != 1:
        an.fix_all([src], f"grouped conv '{name}' with {c_in} in and {c_out} out channels reads a concatenation")
        located = an.set_layout(node, an.fresh(node, f"output of grouped conv '{name}' ({c_in} -> {c_out} channels)"))
        if name == node.target:
            an.pinned(node, module, handler)
        return located
    if handler.channels_normalised:  # weight standardisation over the input channels
        for g in src[1]:
            an.groups.normalise(g)
    out = an.groups.new(c_out)
    if groups > 1:  # a depth multiplier (out = m x in): widening adds whole groups on both sides (or merges them)
        an.groups.multiply(src[1][0], out, c_in // groups, c_out // groups, grouped_conv=True)
    an.record_layer(name, inputs=src[1], outputs=(out,))
    an.role(name, "conv", src[1])
    return axis, (out,)


def channelwise_layout(
    an: ChannelAnalysis, step: Step, name: str, module: nn.Module, handler: ChannelHandler, src: Located
) -> Located:
    """One entry per channel (BatchNorm, LayerNorm over the channels): the channels pass through; a norm whose
    statistics mix them marks their groups normalised."""
    an.role(name, "channelwise", src[1])
    if handler.channels_normalised:  # statistics mix channels
        for g in src[1]:
            an.groups.normalise(g, 1)
    return src


def group_norm_layout(
    an: ChannelAnalysis, step: Step, name: str, module: nn.Module, handler: ChannelHandler, src: Located
) -> Located:
    """A norm over channel groups: widened by whole new groups of the same size where the segments allow, else
    each group wider (and its statistics with it)."""
    an.role(name, "channelwise", src[1])
    groups = getattr(module, handler.groups_attr)  # type: ignore[attr-defined]
    size = handler.count(module, handler.in_attr) // groups
    whole_groups = groups > 1 and not any(an.groups.width[g] % size for g in src[1])
    for g in src[1]:
        if whole_groups:
            an.groups.restrict(g, size)
        else:  # widen each group
            an.groups.normalise(g, groups)
    return src


def attention_layout(
    an: ChannelAnalysis, step: Step, name: str, module: nn.Module, handler: ChannelHandler, src: Located
) -> None:
    """``nn.MultiheadAttention`` called in the graph: query, key and value share one layout, widened by whole
    heads; its output is (attention, weights), recorded as pieces."""
    node = step.node
    qkv = [
        node.kwargs.get(k, node.args[i] if len(node.args) > i else None)
        for i, k in enumerate(("query", "key", "value"))
    ]
    operands = [an.lay(a) for a in qkv]
    totals = {an.groups.total(lo[1]) for lo in operands if lo is not None}
    if any(lo is None or lo[0] != src[0] for lo in operands) or len(totals) != 1:
        an.fix_all(operands, f"{type(module).__name__} '{name}' reads keys or values laid out unlike its queries")
        return None
    layout = an.groups.union_layouts(an.groups.align([lo[1] for lo in operands]))
    whole_units(an, name, layout, module.head_dim, "attention", "heads")
    an.role(name, "channelwise", layout)
    an.set_pieces(node, [(src[0], layout), None])
    return None


def conv_slides_along(an: ChannelAnalysis, step: Step, src: Located, guessed: bool) -> bool:
    """A conv reading the channels as its length (ECA's Conv1d over (N, 1, C)): any width runs, but the last old
    channels see new neighbours instead of zero padding, so the group is marked normalised."""
    if src[0] < 2 or guessed or step.shape is None or step.shape[src[0]] != step.src_shape[src[0]]:
        return False
    for g in src[1]:
        an.groups.normalise(g)
    return True


def _never_slides(an: ChannelAnalysis, step: Step, src: Located, guessed: bool) -> bool:
    return False


@dataclass(frozen=True)
class LayoutRule:
    """How the analysis reads one kind of layer: ``inner`` for a layer a leaf block calls or that is read through
    its weight, ``called`` for one called in the traced graph (default: ``inner``), ``slides_along`` whether it
    reads the channels as its length, seen before its axis is checked."""

    inner: LayerLayout
    called: Optional[LayerLayout] = None
    slides_along: Callable[[ChannelAnalysis, Step, Located, bool], bool] = _never_slides

    def layout(
        self, an: ChannelAnalysis, step: Step, name: str, module: nn.Module, handler: ChannelHandler, src: Located
    ) -> Optional[Located]:
        return (self.called or self.inner)(an, step, name, module, handler, src)


#: the layout rules by the name a handler gives in ``layout_rule``
LAYOUT_RULES: Dict[str, LayoutRule] = {
    "weight": LayoutRule(weight_layout),  # conv/linear: a new output group (grouped convs: whole groups)
    "conv": LayoutRule(weight_layout, slides_along=conv_slides_along),  # ECA's Conv1d slides along the channels
    "channelwise": LayoutRule(channelwise_layout),  # BatchNorm, LayerNorm, BlurPool: the channels pass through
    "group_norm": LayoutRule(group_norm_layout),  # GroupNorm, EvoNorm-S: whole groups or wider ones
    "attention": LayoutRule(weight_layout, called=attention_layout),  # nn.MultiheadAttention: whole heads
}


def layout_rule(handler: ChannelHandler) -> LayoutRule:
    """The rule ``handler`` names; a clear error for a name the analysis does not know."""
    try:
        return LAYOUT_RULES[handler.layout_rule]
    except KeyError:
        raise ValueError(
            f"{handler!r} names layout_rule {handler.layout_rule!r}; the channel analysis knows {sorted(LAYOUT_RULES)}"
        ) from None
