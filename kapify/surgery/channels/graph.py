"""The channel-group model: groups, the union-find that builds them, and the finished graph."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["ChannelGroup", "ChannelGraph", "GroupSet", "Layout"]

Layout = Tuple[int, ...]  # the channel axis of a tensor: segments, each one group id


@dataclass
class ChannelGroup:
    """Channels that must keep one width: who produces, reads and carries them."""

    id: int
    width: int
    producers: List[str] = field(default_factory=list)   # conv/linear modules whose outputs are these channels
    consumers: List[str] = field(default_factory=list)   # conv/linear modules reading them as inputs
    channelwise: List[str] = field(default_factory=list)  # BatchNorm, LayerNorm, depthwise convs, LayerScale parameters
    divisor: int = 1                                        # grouped convs: the width must stay divisible by this
    fixed: Optional[str] = None                             # why the width cannot change (None: free)
    normalised: bool = False                                # a member normalises across channels (GroupNorm)


@dataclass
class ChannelGraph:
    """The result of :func:`analyze_channels`: groups, and each module's channel layouts."""

    groups: List[ChannelGroup]
    inputs: Dict[str, Layout]   # conv/linear -> layout of its input channels (segments: concat)
    outputs: Dict[str, int]     # conv/linear -> group of its output channels
    channelwise: Dict[str, Layout]  # BatchNorm, depthwise conv, ... -> layout of its channels
    parameters: Dict[str, Tuple[int, Layout]] = field(default_factory=dict)  # parameter used directly (LayerScale) -> (dim, layout)
    spread: Dict[str, int] = field(default_factory=dict)  # linear reading flattened C x H x W features -> H*W entries per channel

    def group_of(self, module_name: str) -> Optional[ChannelGroup]:
        """The group a conv's output channels belong to (a depthwise conv's: its input's)."""
        gid = self.outputs.get(module_name)
        if gid is None and len(self.channelwise.get(module_name, ())) == 1:
            gid = self.channelwise[module_name][0]
        return None if gid is None else self.groups[gid]


class GroupSet:
    """Union-find over provisional groups: merging two checks their widths and keeps the strictest
    constraints (fixed reason, divisor, normalised)."""

    def __init__(self) -> None:
        self.parent: List[int] = []
        self.fixed: Dict[int, str] = {}
        self.divisor: Dict[int, int] = {}
        self.width: Dict[int, int] = {}
        self.normalised: set = set()

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

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        self.parent[b] = a
        if b in self.fixed:
            self.fixed.setdefault(a, self.fixed[b])
        if self.width.get(a) != self.width.get(b):
            self.fixed.setdefault(a, f"channel counts {self.width.get(a)} and {self.width.get(b)} meet")
        if b in self.normalised:
            self.normalised.add(a)
        self.divisor[a] = math.lcm(self.divisor.get(a, 1), self.divisor.get(b, 1))
        return a

    def fix(self, g: int, why: str) -> None:
        self.fixed.setdefault(self.find(g), why)

    def normalise(self, g: int, divisor: int = 1) -> None:
        """Mark g's channels as mixed by statistics (GroupNorm: widths stay multiples of its groups)."""
        self.normalised.add(self.find(g))
        self.restrict(g, divisor)

    def restrict(self, g: int, divisor: int) -> None:
        """g's width must stay a multiple of ``divisor`` (grouped convs, GroupNorm)."""
        root = self.find(g)
        self.divisor[root] = math.lcm(self.divisor.get(root, 1), divisor)

    def total(self, layout: Layout) -> int:
        return sum(self.width[self.find(g)] for g in layout)

    def to_graph(self, inputs: Dict[str, Layout], outputs: Dict[str, int], roles: Dict[str, List[Tuple[str, Layout]]],
                 parameters: Dict[str, Tuple[int, int]], spreads: Dict[str, int]) -> ChannelGraph:
        """The finished :class:`ChannelGraph`: one numbered group per root, members filled in."""
        roots = sorted({self.find(g) for g in range(len(self.parent))})
        index = {r: i for i, r in enumerate(roots)}
        groups = [ChannelGroup(id=i, width=self.width[r], divisor=self.divisor.get(r, 1), fixed=self.fixed.get(r),
                               normalised=r in self.normalised) for i, r in enumerate(roots)]
        renum = lambda g: index[self.find(g)]  # noqa: E731
        for name, gid in outputs.items():
            groups[renum(gid)].producers.append(name)
        for name, entries in roles.items():
            for role, lo in entries:
                for g in lo:
                    target = groups[renum(g)]
                    if role == "conv":
                        target.consumers.append(name)
                    elif name not in target.channelwise:
                        target.channelwise.append(name)
        for name, (_, gid) in parameters.items():
            groups[renum(gid)].channelwise.append(name)
        return ChannelGraph(
            groups=groups,
            inputs={n: tuple(renum(g) for g in lo) for n, lo in inputs.items()},
            outputs={n: renum(g) for n, g in outputs.items()},
            channelwise={n: tuple(renum(g) for g in lo) for n, entries in roles.items() for role, lo in entries if role != "conv"},
            parameters={n: (dim, (renum(g),)) for n, (dim, g) in parameters.items()},
            spread=spreads,
        )
