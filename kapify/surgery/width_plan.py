"""The width plan: each channel group's new width, read off a finished channel graph (which it never changes).

:func:`plan_widths` applies a width rule to every free group, then settles what the graph couples: grouped convs
whose output follows their input (depth multipliers, attention heads), pieces that must keep one width, convs whose
split output should still total a square, and leading split pieces that must stay the widest. Groups that keep their
width get the reason in :attr:`WidthPlan.fixed` (the graph's own reasons, plus the plan's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .channels import ChannelGraph
from .regroup import merged_index, merged_square
from .squares import MAX_GROWTH, MAX_GROWTH_GROUPED

__all__ = ["WidthFn", "WidthPlan", "growth_limits", "plan_widths", "why_not_square"]

WidthFn = Callable[..., int]
Units = Dict[int, Tuple[int, ...]]

NORMALISED = (
    "a GroupNorm/LayerNorm normalises across these channels (or attention scales by their count): "
    "new ones would change the function"
)


@dataclass
class WidthPlan:
    """Plain data: ``widths`` (group id -> new width), ``merged`` (output group of a grouped conv that merges its
    groups -> its new number of groups), ``index`` (group id -> new position of each old channel: old ones first,
    merged groups spread out) and ``fixed`` (group id -> why it keeps its width)."""

    widths: Dict[int, int]
    merged: Dict[int, int] = field(default_factory=dict)
    index: Dict[int, torch.Tensor] = field(default_factory=dict)
    fixed: Dict[int, str] = field(default_factory=dict)


def growth_limits(graph: ChannelGraph) -> Callable[[Iterable[int]], int]:
    """How much groups may grow to reach a square: :data:`MAX_GROWTH_GROUPED` where a grouped or depthwise conv pools
    one of them or, with a depth multiplier, sets its width from them (spare filters cannot stand in there), else
    :data:`MAX_GROWTH`."""
    multiplied = set(graph.depth_multiplied) | {
        graph.multiplied[out][0] for out in graph.depth_multiplied if out in graph.multiplied
    }  # an output whose input group the analysis dropped (e.g. cut into segments) still counts
    grouped = {g for name in graph.grouped for g in graph.channelwise[name]} | multiplied
    return lambda groups: MAX_GROWTH_GROUPED if grouped.intersection(groups) else MAX_GROWTH


def plan_widths(
    graph: ChannelGraph,
    width_fn: WidthFn,
    function_preserving: bool,
    widen_normalised: bool = False,
    convs: Iterable[str] = (),
) -> WidthPlan:
    """The new width of every group of ``graph`` under ``width_fn``. With ``function_preserving`` and not
    ``widen_normalised``, channel-normalised groups keep theirs. ``convs``: the conv layers (KAP pools them), whose
    outputs the square rule makes square also where they are split."""
    return _Planner(graph, width_fn, function_preserving and not widen_normalised).plan(set(convs))


def why_not_square(graph: ChannelGraph, plan: WidthPlan, name: str) -> str:
    """Why conv ``name``'s planned output is not a square number of channels."""
    layout = graph.output_layout(name)
    if not layout:
        return "not in the traced graph"
    stuck = next((plan.fixed[g] for g in layout if g in plan.fixed), None)
    if stuck:
        return stuck
    multiplied = graph.multiplied.get(layout[0])
    if len(layout) == 1 and multiplied is not None:
        return f"widens with its input in whole groups or heads ({multiplied[2]} per {multiplied[1]} input channels)"
    if len(layout) > 1:
        widths = " + ".join(str(graph.groups[g].width) for g in layout)
        return f"its output is split into {len(layout)} segments ({widths} channels) whose widths other convs set"
    divisor = graph.groups[layout[0]].divisor
    return f"no square within {growth_limits(graph)(layout)}x is a multiple of {divisor} (whole groups or heads)"


class _Planner:
    """One planning pass: the graph (read only), the widths and fixed reasons it fills in."""

    def __init__(self, graph: ChannelGraph, width_fn: WidthFn, keep_normalised: bool) -> None:
        self.graph, self.width_fn, self.keep_normalised = graph, width_fn, keep_normalised
        self.square_rule = getattr(width_fn, "takes_divisor", False)
        self.growth = growth_limits(graph)
        self.widths: Dict[int, int] = {}
        self.fixed: Dict[int, str] = {g.id: g.fixed for g in graph.groups if g.fixed is not None}

    def plan(self, convs: set) -> WidthPlan:
        for g in self.graph.groups:
            self.widths[g.id] = self._rule_width(g)
        self._derive_multiplied()
        units = self._tie_units()
        if self.square_rule:  # make split convs' whole outputs square too
            self._square_split_outputs(units, convs)
        self._keep_leading_pieces_widest()
        merged: Dict[int, int] = {}
        self._derive_multiplied(merged if self.square_rule else None)  # again, from inputs those steps grew
        index = {g.id: torch.arange(g.width) for g in self.graph.groups}  # old channels first
        for out, groups in merged.items():  # in graph order: one's input may be another's output
            inp, per_in, per_out = self.graph.multiplied[out]
            index[out] = merged_index(
                index[inp], per_in, per_out, self.widths[inp] // groups, self.widths[out] // groups
            )
        return WidthPlan(self.widths, merged, index, self.fixed)

    def _rule_width(self, g) -> int:
        if self.keep_normalised and g.normalised and g.id not in self.fixed:
            self.fixed[g.id] = NORMALISED
        if g.id in self.fixed or not g.producers:
            return g.width
        new = (
            self.width_fn(g.width, divisor=g.divisor, max_growth=self.growth((g.id,)))
            if self.square_rule
            else self.width_fn(g.width)
        )
        if not isinstance(new, int) or isinstance(new, bool):
            raise ValueError(f"the width rule returned {new!r} for {g.width} channels; it must return an int")
        if new < g.width:
            raise ValueError(
                f"the width rule shrinks {g.width} channels to {new} (group of {g.producers[0]}); re-widening only "
                f"grows"
            )
        return -(-new // g.divisor) * g.divisor  # grouped convs: round up to a multiple of the groups

    def _derive_multiplied(self, merged: Optional[Dict[int, int]] = None) -> None:
        """Grouped convs with a depth multiplier, attention heads: the output width follows the input's. With
        ``merged`` (the square rule), a grouped conv whose output would not be square merges its groups to make it
        square where :func:`~kapify.surgery.regroup.merged_square` finds a way (out group -> its number of groups)."""
        graph, widths = self.graph, self.widths
        ties = {g for tie in graph.ties for g in tie}
        for out, (inp, per_in, per_out) in graph.multiplied.items():
            if out in self.fixed:
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

    def _tie_units(self) -> Units:
        """Groups that must keep one width (pieces of an equal split) get the widest planned width, or all
        keep theirs when one cannot change. Returns each group's unit (the groups tied to it, itself included)."""
        graph = self.graph
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
            stuck = [g for g in members if g in self.fixed or not graph.groups[g].producers]
            for g in members:
                units[g] = tuple(members)
                if stuck:
                    self.widths[g] = graph.groups[g].width
                    self.fixed[g] = self.fixed.get(g) or (
                        f"split into pieces of one width with channels that stay: {self.fixed.get(stuck[0])}"
                    )
                else:
                    self.widths[g] = max(self.widths[m] for m in members)
        return units

    def _square_split_outputs(self, units: Units, convs: set) -> None:
        """A conv whose output is later split (CSPNet, Res2Net, DPN) has several segments; where one of them
        (or one tied set) is no conv's whole output, size it so that the conv's total is a square too."""
        graph = self.graph
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
                if not (set(units[g]) & (whole | locked)) and g not in self.fixed and graph.groups[g].producers
            ]

        # the outputs with the fewest free segments first (SHViT: q, k, v with only v free, before the stream v is
        # cut from)
        for layout in sorted(outputs.values(), key=lambda lo: len(free_units(lo))):
            if len(layout) < 2:
                continue
            free = free_units(layout)
            if not any(self._square_total(layout, unit, caps) for unit in free):
                self._grow_whole_segment(layout, free, units, whole - locked, caps)
            locked.update(layout)

    def _grow_whole_segment(
        self, layout: Tuple[int, ...], free: List[Tuple[int, ...]], units: Units, grown: set, caps: Dict
    ) -> None:
        """No free segment squares the total alone (CS3Darknet: 36 + at most 36 has no square): try the next
        squares (up to two) for a segment that is a conv's whole output (with the pieces tied to it), then the free
        ones again."""
        widths = self.widths
        for unit in dict.fromkeys(units[g] for g in layout if g in grown):
            if any(g in self.fixed or g not in grown for g in unit):
                continue
            old = widths[unit[0]]
            divisor = math.lcm(*(self.graph.groups[g].divisor for g in unit))
            for _ in range(2):
                for g in unit:
                    widths[g] = self.width_fn(widths[g] + 1, divisor=divisor, max_growth=self.growth(unit))
                if any(self._square_total(layout, free_unit, caps) for free_unit in free):
                    return
            for g in unit:
                widths[g] = old

    def _square_total(self, layout: Tuple[int, ...], unit: Tuple[int, ...], caps: Dict) -> bool:
        """Give ``unit``'s groups the least width (from their old one) that makes ``layout``'s total a square the
        width rule would pick (a multiple of 16 from 64 on), or any square if that one is over twice as wide
        (RegNet-128GF's 11 groups of 264: 11 x 275 = 3025, not 11 x 704 = 7744)."""
        widths, groups = self.widths, self.graph.groups
        count = sum(layout.count(g) for g in unit)
        others = sum(widths[g] for g in layout if g not in unit)
        old = groups[unit[0]].width
        step = math.lcm(*(groups[g].divisor for g in unit))
        cap = min(
            (sum(widths[p] for p in caps[g]) for g in unit if g in caps),
            default=self.growth(layout) * (others + count * old),
        )

        def least(square: Callable[[int], bool]) -> Optional[int]:
            return next((w for w in range(old, cap + 1, step) if square(others + count * w)), None)

        ruled = least(lambda t: self.width_fn(t, divisor=1) == t)
        plain = least(lambda t: math.isqrt(t) ** 2 == t)
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

    def _keep_leading_pieces_widest(self) -> None:
        """``x.split(size)`` makes pieces of ``size`` and a last one no wider: widen the leading pieces' last segment
        if needed."""
        widths, groups = self.widths, self.graph.groups
        for site in self.graph.slices:
            if site.kind != "leading" or len(site.pieces) < 2:
                continue
            lead, last = (sum(widths[g] for g in site.pieces[i]) for i in (0, -1))
            if last > lead:
                for piece in site.pieces[:-1]:
                    g = piece[-1]
                    widths[g] += -(-(last - lead) // groups[g].divisor) * groups[g].divisor
