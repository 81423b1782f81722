"""The channel-group model: groups, the union-find that builds them, and the finished graph."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["ChannelGroup", "ChannelGraph", "GroupSet", "Layout", "SliceSite"]

Layout = Tuple[int, ...]  # the channel axis of a tensor: segments, each one group id


@dataclass
class SliceSite:
    """A split or slice of the channels whose sizes a block stores (``x.split(self.width, 1)``,
    ``x[:, :self.out_chs]``): after re-widening, its block handler rewrites them.

    ``owner``: the block's module path; ``boundaries``: (old channel offset, the segments before it),
    so the new offset is the new width of those segments; ``kind``: "equal" (chunk: all pieces one
    width), "leading" (split by one size: all pieces but the last one width, the last no wider) or
    "offsets" (sizes listed, slices, narrow: any widths)."""

    owner: str
    boundaries: List[Tuple[int, Layout]]
    kind: str = "offsets"
    pieces: List[Layout] = field(default_factory=list)


@dataclass
class ChannelGroup:
    """Channels that must keep one width: who produces, reads and carries them."""

    id: int
    width: int
    producers: List[str] = field(default_factory=list)  # conv/linear modules whose outputs are these channels
    consumers: List[str] = field(default_factory=list)  # conv/linear modules reading them as inputs
    channelwise: List[str] = field(default_factory=list)  # BatchNorm, LayerNorm, depthwise convs, LayerScale parameters
    divisor: int = 1  # grouped convs: the width must stay divisible by this
    fixed: Optional[str] = None  # why the width cannot change (None: free)
    normalised: bool = False  # a member normalises across channels (GroupNorm)


@dataclass
class ChannelGraph:
    """The result of :func:`analyze_channels`: groups, and each module's channel layouts."""

    groups: List[ChannelGroup]
    inputs: Dict[str, Layout]  # conv/linear -> layout of its input channels (segments: concat)
    outputs: Dict[str, Layout]  # conv/linear -> layout of its output channels (several segments: split later)
    channelwise: Dict[str, Layout]  # BatchNorm, depthwise conv, ... -> layout of its channels
    parameters: Dict[str, Tuple[int, Layout]] = field(
        default_factory=dict
    )  # parameter used directly (LayerScale) -> (dim, layout)
    spread: Dict[str, int] = field(
        default_factory=dict
    )  # linear reading flattened C x H x W features -> H*W entries per channel
    slices: List[SliceSite] = field(default_factory=list)  # stored split sizes, rewritten by block handlers
    ties: List[Tuple[int, ...]] = field(default_factory=list)  # groups that must keep one width (equal pieces)
    grouped: List[str] = field(default_factory=list)  # depthwise/grouped convs (their output layout is in channelwise)
    multiplied: Dict[int, Tuple[int, int, int]] = field(
        default_factory=dict
    )  # out group -> (in group, a, b): out = in / a * b
    depth_multiplied: List[int] = field(
        default_factory=list
    )  # those out groups a grouped conv makes (it may merge its groups)
    module_shapes: Dict[str, Tuple[int, ...]] = field(
        default_factory=dict
    )  # module -> shape of the last tensor it computed (its output)

    def conv_outputs(self) -> Dict[str, Layout]:
        """Every conv's output layout, depthwise ones included: the channels each KAP pools."""
        return {**self.outputs, **{name: self.channelwise[name] for name in self.grouped}}

    def output_layout(self, module_name: str) -> Layout:
        """The segments of a conv's output channels (a depthwise conv's: its input's); () if unknown."""
        return self.outputs.get(module_name) or self.channelwise.get(module_name, ())

    def group_of(self, module_name: str) -> Optional[ChannelGroup]:
        """The group a conv's output channels belong to, when they are one group (else None)."""
        layout = self.output_layout(module_name)
        return self.groups[layout[0]] if len(layout) == 1 else None


def _one_stored_size(slices: List[SliceSite]) -> List[Tuple[int, ...]]:
    """Groups a block cuts or reshapes at one stored size (SHViT's ``split(x, [self.pdim, ...])`` of the stream
    and ``reshape(B, self.pdim, H, W)`` of its attention's values): they keep one width."""
    cut_at: Dict[Tuple[str, int], set] = {}
    for site in slices:
        for at, prefix in site.boundaries:
            if len(prefix) == 1:
                cut_at.setdefault((site.owner, at), set()).add(prefix[0])
    return [tuple(sorted(groups)) for groups in cut_at.values() if len(groups) > 1]


class GroupSet:
    """Union-find over provisional groups: merging two checks their widths and keeps the strictest
    constraints (fixed reason, divisor, normalised)."""

    def __init__(self) -> None:
        self.parent: List[int] = []
        self.fixed: Dict[int, str] = {}
        self.divisor: Dict[int, int] = {}
        self.width: Dict[int, int] = {}
        self.normalised: set = set()
        self.parts: Dict[int, Tuple[int, int]] = {}  # a root cut in two at a split or slice: its segments
        self.ties: List[
            Tuple[List[Layout], str]
        ] = []  # layouts that must keep equal widths (pieces of x.chunk(n)), why
        self.multiplied: List[
            Tuple[int, int, int, int]
        ] = []  # (input group, output group, in, out per conv group or head)
        self.depth_multiplied: List[int] = []  # output groups of grouped convs among them

    def new(self, width: int, fixed: Optional[str] = None) -> int:
        self.parent.append(len(self.parent))
        gid = len(self.parent) - 1
        self.width[gid] = width
        if fixed:
            self.fixed[gid] = fixed
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def leaves(self, g: int) -> Layout:
        """The segments g is cut into (itself when it was never cut)."""
        root = self.find(g)
        return (root,) if root not in self.parts else tuple(x for p in self.parts[root] for x in self.leaves(p))

    def expand(self, layout: Layout) -> Layout:
        return tuple(x for g in layout for x in self.leaves(g))

    def cut(self, layout: Layout, at: int) -> None:
        """Make channel offset ``at`` of ``layout`` a segment boundary (a split or slice there)."""
        offset = 0
        for leaf in self.expand(layout):
            width = self.width[leaf]
            if offset < at < offset + width:
                self._cut(leaf, at - offset)
                return
            offset += width

    def _cut(self, root: int, at: int) -> None:
        parts = (self.new(at), self.new(self.width[root] - at))
        divisor = self.divisor.get(root, 1)
        for part in parts:
            self.divisor[part] = divisor
            if root in self.fixed:
                self.fixed[part] = self.fixed[root]
            if root in self.normalised:
                self.normalised.add(part)
            if at % divisor:
                self.fixed.setdefault(part, f"cut at {at} channels inside groups of {divisor} (grouped conv)")
        self.parts[root] = parts

    def align(self, layouts: List[Layout]) -> List[Layout]:
        """Cut equally wide layouts at each other's segment boundaries; return them expanded."""
        while len({tuple(self.offsets(layout)) for layout in layouts}) > 1:  # a cut group may recur elsewhere
            for at in sorted({at for layout in layouts for at in self.offsets(layout)}):
                for other in layouts:
                    self.cut(other, at)
        return [self.expand(layout) for layout in layouts]

    def offsets(self, layout: Layout) -> List[int]:
        """The inner segment boundaries of ``layout`` (channel offsets)."""
        ends, offset = [], 0
        for leaf in self.expand(layout)[:-1]:
            offset += self.width[leaf]
            ends.append(offset)
        return ends

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if (a in self.parts or b in self.parts) and self.width[a] == self.width[b]:  # merge segment by segment
            self.union_layouts(self.align([(a,), (b,)]))
            return a
        self.parent[b] = a
        if b in self.fixed:
            self.fix(a, self.fixed[b])
        if self.width.get(a) != self.width.get(b):
            self.fix(a, f"channel counts {self.width.get(a)} and {self.width.get(b)} meet")
        if b in self.normalised:
            self.normalised.add(a)
        self.divisor[a] = math.lcm(self.divisor.get(a, 1), self.divisor.get(b, 1))
        return a

    def union_layouts(self, layouts: List[Layout]) -> Layout:
        """Merge layouts with as many segments segment by segment (an add, aligned pieces); the merged layout."""
        merged = list(layouts[0])
        for layout in layouts[1:]:
            merged = [self.union(a, b) for a, b in zip(merged, layout)]
        return tuple(merged)

    def fix(self, g: int, why: str) -> None:
        for leaf in self.leaves(g):
            self.fixed.setdefault(leaf, why)

    def is_fixed(self, g: int) -> bool:
        return all(leaf in self.fixed for leaf in self.leaves(g))

    def normalise(self, g: int, divisor: int = 1) -> None:
        """Mark g's channels as mixed by statistics (GroupNorm: widths stay multiples of its groups)."""
        self.normalised.update(self.leaves(g))
        self.restrict(g, divisor)

    def restrict(self, g: int, divisor: int) -> None:
        """g's width must stay a multiple of ``divisor`` (grouped convs, GroupNorm)."""
        for leaf in self.leaves(g):
            self.divisor[leaf] = math.lcm(self.divisor.get(leaf, 1), divisor)

    def total(self, layout: Layout) -> int:
        return sum(self.width[self.find(g)] for g in layout)

    def tie(self, layouts: List[Layout], why: str) -> None:
        """These layouts must keep equal widths, segment by segment (the pieces of ``x.chunk(n)``)."""
        self.ties.append((layouts, why))

    def to_graph(
        self,
        inputs: Dict[str, Layout],
        outputs: Dict[str, Layout],
        roles: Dict[str, List[Tuple[str, Layout]]],
        parameters: Dict[str, Tuple[int, int]],
        spreads: Dict[str, int],
        slices: List[SliceSite],
    ) -> ChannelGraph:
        """The finished :class:`ChannelGraph`: one numbered group per segment, members filled in."""
        ties = []
        for layouts, why in self.ties:
            pieces = [self.expand(layout) for layout in layouts]
            if len({tuple(self.width[g] for g in p) for p in pieces}) == 1:  # cut alike: tie segment by segment
                ties += [tuple(column) for column in zip(*pieces)]
            else:
                for layout in layouts:
                    for g in layout:
                        self.fix(g, f"{why}: its pieces were cut differently")
        self._fix_multiplied()
        roots = sorted({self.find(g) for g in range(len(self.parent))} - set(self.parts))
        index = {r: i for i, r in enumerate(roots)}
        groups = [
            ChannelGroup(
                id=i,
                width=self.width[r],
                divisor=self.divisor.get(r, 1),
                fixed=self.fixed.get(r),
                normalised=r in self.normalised,
            )
            for i, r in enumerate(roots)
        ]

        def renum(layout: Layout) -> Layout:
            return tuple(index[leaf] for leaf in self.expand(layout))

        for name, layout in outputs.items():
            for g in renum(layout):
                groups[g].producers.append(name)
        for name, entries in roles.items():
            for role, layout in entries:
                for g in renum(layout):
                    if role == "conv":
                        groups[g].consumers.append(name)
                    elif name not in groups[g].channelwise:
                        groups[g].channelwise.append(name)
        for name, (_, gid) in parameters.items():
            for g in renum((gid,)):
                groups[g].channelwise.append(name)
        slices = [
            SliceSite(s.owner, [(at, renum(lo)) for at, lo in s.boundaries], s.kind, [renum(p) for p in s.pieces])
            for s in slices
        ]
        return ChannelGraph(
            groups=groups,
            inputs={n: renum(lo) for n, lo in inputs.items()},
            outputs={n: renum(lo) for n, lo in outputs.items()},
            channelwise={n: renum(lo) for n, entries in roles.items() for role, lo in entries if role != "conv"},
            parameters={n: (dim, renum((g,))) for n, (dim, g) in parameters.items()},
            spread=spreads,
            slices=slices,
            ties=[
                tuple(sorted({index[self.find(g)] for g in tie}))
                for tie in ties
                if len({self.find(g) for g in tie}) > 1
            ]
            + _one_stored_size(slices),
            grouped=[n for n, entries in roles.items() if any(role == "grouped" for role, _ in entries)],
            multiplied={
                index[self.find(o)]: (index[self.find(i)], a, b)
                for i, o, a, b in self.multiplied
                if self.find(i) in index and self.find(o) in index
            },
            depth_multiplied=[index[self.find(o)] for o in self.depth_multiplied if self.find(o) in index],
        )

    def multiply(self, inp: int, out: int, per_in: int, per_out: int, grouped_conv: bool = False) -> None:
        """A grouped conv with ``per_in`` -> ``per_out`` channels per group (a depth multiplier), or channels
        of ``per_in`` per attention head (``per_out`` = 1: the heads): widening adds whole groups or heads,
        so the output keeps ``per_out / per_in`` times its input's width. A grouped conv may instead merge
        its groups (:mod:`kapify.surgery.regroup`): its output's own groups set no divisor."""
        self.restrict(inp, per_in)
        if grouped_conv:
            self.depth_multiplied.append(out)
        else:
            self.restrict(out, per_out)
        self.multiplied.append((inp, out, per_in, per_out))

    def _join_multiplied(self) -> None:
        """Two relations with one ratio and one side in common have the other side in common too (the q
        and k projections behind heads that attention merged must keep one width)."""
        changed = True
        while changed:
            changed, seen = False, {}
            for inp, out, a, b in self.multiplied:
                for key, other in (((0, self.expand((out,)), a, b), inp), ((1, self.expand((inp,)), a, b), out)):
                    if key in seen and self.expand((seen[key],)) != self.expand(
                        (other,)
                    ):  # segment by segment (cut groups)
                        self.union(seen[key], other)
                        changed |= self.expand((seen[key],)) == self.expand((other,))  # else they cannot meet: no rerun
                    seen.setdefault(key, other)

    def _fix_multiplied(self) -> None:
        """A grouped conv's input and output widths change together or not at all; its input's width must
        make the output's a multiple of what the output needs (chained grouped convs)."""
        self._join_multiplied()
        for inp, out, per_in, per_out in reversed(self.multiplied):
            need = self.divisor.get(self.find(out), 1)
            self.restrict(inp, per_in * need // math.gcd(per_out, need))
        for inp, out, _, _ in self.multiplied:
            if len(self.leaves(inp)) > 1 or len(self.leaves(out)) > 1:
                for g in (inp, out):
                    self.fix(g, "widens in whole groups or heads, but is split into segments")
        changed = True
        while changed:
            changed = False
            for inp, out, _, _ in self.multiplied:
                for this, other in ((inp, out), (out, inp)):
                    if self.is_fixed(this) and not self.is_fixed(other):
                        self.fix(
                            other,
                            f"widens in whole groups or heads with channels that cannot: "
                            f"{self.fixed[self.leaves(this)[0]]}",
                        )
                        changed = True
