"""The state of one channel-analysis pass, and the operations rules use on it.

A rule reads a :class:`Step` (the node, its shape, its arguments' layouts) and returns the layout of the node's
output; what else it learns it records through the :class:`ChannelAnalysis` methods below (a layer's input and
output groups, a parameter's group, a stored split, the pieces of a split), never by writing the state directly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from ..handlers import ChannelHandler, channel_handler
from .axes import name_of, shape_of
from .blocks import block_owner
from .graph import GroupSet, Layout, SliceSite

__all__ = ["ChannelAnalysis", "Located", "Step"]

Located = Tuple[int, Layout]  # (the tensor dim holding the channels, its segments)


@dataclass
class Step:
    """The node being visited, with what the rules read about it."""

    node: fx.Node
    shape: Optional[torch.Size]
    args: List[fx.Node]  # tensor-valued arguments (inside lists too: torch.cat([a, b]))
    src: Optional[Located]  # layout of the first tensor argument
    src_shape: Optional[torch.Size]  # shape of the first tensor argument
    located: List[Tuple[fx.Node, Located]] = field(default_factory=list)  # arguments with a layout


class ChannelAnalysis:
    """The state of one pass: each node's layout, the groups, and each layer's role in them."""

    def __init__(self, gm: fx.GraphModule, root: type = nn.Module, model: Optional[nn.Module] = None) -> None:
        self.gm, self.root = gm, root  # root: the traced model's class (a block handler may own its forward)
        self.model = (
            model if model is not None else gm
        )  # the traced model (a layer read through its weight keeps its type there)
        self.groups = GroupSet()
        self.layout: Dict[fx.Node, Optional[Located]] = {}
        self.inputs: Dict[str, Layout] = {}
        self.outputs: Dict[str, Layout] = {}
        self.roles: Dict[str, List[Tuple[str, Layout]]] = {}
        self.parameters: Dict[str, Tuple[int, int]] = {}  # parameter path -> (its channel dim, its group)
        self.floating: Dict[
            fx.Node, fx.Node
        ] = {}  # an expanded/cast parameter whose channel dim is not known yet -> its get_attr
        self.spread: Dict[fx.Node, int] = {}  # a flattened tensor whose channels span k consecutive entries each
        self.spreads: Dict[str, int] = {}  # the linear layers reading such tensors
        self.pieces: Dict[fx.Node, List[Optional[Located]]] = {}  # split/chunk results: the layout of each piece
        self.slices: List[SliceSite] = []  # splits and slices at sizes a block stores
        self.module_shapes: Dict[
            str, Tuple[int, ...]
        ] = {}  # module path -> shape of the last tensor computed inside it

    # -- helpers the rules share -------------------------------------------------------------------
    def lay(self, arg: Any) -> Optional[Located]:
        """A node's layout, its segments as cut so far (splits refine groups after the fact)."""
        lo = self.layout.get(arg) if isinstance(arg, fx.Node) else None
        return None if lo is None else (lo[0], self.groups.expand(lo[1]))

    def fix_all(self, located: Iterable[Optional[Located]], why: str) -> None:
        for lo in located:
            for g in lo[1] if lo else ():
                self.groups.fix(g, why)

    def fresh(self, node: fx.Node, why: str) -> Optional[Located]:
        """A new, fixed group for a tensor whose channels the analysis cannot follow."""
        shape = shape_of(node)
        return (1, (self.groups.new(int(shape[1]), why),)) if shape is not None and len(shape) >= 2 else None

    def merge(self, operands: List[Tuple[fx.Node, Located]], node: fx.Node) -> Optional[Located]:
        """Broadcasting ops: channel dims must line up counted from the right, segments must match."""
        offsets = {len(shape_of(a)) - lo[0] for a, lo in operands}
        if (
            len(offsets) == 1
            and len({len(lo[1]) for _, lo in operands}) > 1
            and len({self.groups.total(lo[1]) for _, lo in operands}) == 1
        ):  # e.g. a split stream added to a whole one
            aligned = self.groups.align([lo[1] for _, lo in operands])
            operands = [(a, (lo[0], segments)) for (a, lo), segments in zip(operands, aligned)]
        if len(offsets) > 1 or len({len(lo[1]) for _, lo in operands}) > 1 or len(shape_of(node) or ()) < max(offsets):
            self.fix_all([lo for _, lo in operands], f"operands of {node.name} are laid out differently")
            return self.fresh(node, f"output of {node.name}")
        return len(shape_of(node)) - offsets.pop(), self.groups.union_layouts([lo[1] for _, lo in operands])

    def moved(self, node: fx.Node, src: Optional[Located], axis: Optional[int], what: str) -> Optional[Located]:
        """The channels moved to ``axis`` (None: they did not survive the op: their groups become fixed)."""
        if src is None:
            return None
        if axis is None:
            self.fix_all([src], f"{what} ({name_of(node.target)}) changes the channel axis")
            return self.fresh(node, f"output of {what}")
        return axis, src[1]

    def role(self, module_name: str, role: str, layout: Layout) -> None:
        """Record that a layer reads (role "conv") or carries ("channelwise", "grouped") these segments."""
        self.roles.setdefault(module_name, []).append((role, layout))

    def pinned(self, node: fx.Node, module: nn.Module, handler: ChannelHandler) -> None:
        """A layer that produces channels the analysis cannot widen: its fixed group still names it, when
        that group is the layer's own output axis (not the tokens of a Linear's (N, tokens, C) output)."""
        lo, shape = self.layout.get(node), shape_of(node)
        if (
            lo is not None
            and len(lo[1]) == 1
            and shape is not None
            and lo[0] == handler.axis % len(shape)
            and self.groups.width[self.groups.find(lo[1][0])] == handler.count(module, handler.out_attr)
        ):
            self.outputs[node.target] = lo[1]

    def lined_up(self, param: fx.Node, other: Tuple[fx.Node, Located]) -> Optional[Located]:
        """A parameter with several dims > 1 (ViT's pos_embed: tokens x C) meeting a laid-out operand
        of a broadcasting op takes the dim lined up with its channels (counted from the right)."""
        (node, (axis, segments)), pshape = other, shape_of(param)
        root = self.floating.get(param, param)  # the get_attr node a cls/reg token expand comes from
        dim = len(pshape) - (len(shape_of(node)) - axis)
        root_dim = dim - (len(pshape) - len(shape_of(root)))
        if (
            len(segments) != 1
            or not 0 <= root_dim < len(shape_of(root))
            or shape_of(root)[root_dim] != shape_of(node)[axis]
        ):
            return None
        known = self.parameters.get(root.target)
        if known is not None and known[0] != root_dim:
            return None
        gid = known[1] if known is not None else self.groups.new(int(shape_of(root)[root_dim]))
        self.parameters[root.target] = (root_dim, gid)
        self.layout[param] = (dim, (gid,))
        return self.layout[param]

    def cut(self, step: Step, sizes: Sequence[int], kind: str, stored: Sequence[int]) -> Optional[List[Located]]:
        """Cut ``step.src`` into pieces of ``sizes`` channels; ``stored``: the offsets a block stores
        (needing its handler), ``kind``: the piece constraint (see :class:`SliceSite`). None: not followed."""
        node, (axis, layout) = step.node, step.src
        if sum(sizes) != self.groups.total(layout):  # the traced layout does not add up: not followed
            return None
        owner, block_type = block_owner(node, self.root) if stored else (None, None)
        if stored and owner is None:
            self.fix_all(
                [step.src],
                f"{node.name} ({name_of(node.target)}) cuts the channels at sizes stored in '{block_type.__name__}': "
                f"register a block handler for it (kapify.register_block_handler)",
            )
            return None
        pieces = self.cut_layout(layout, sizes)
        if kind == "equal" or (kind == "leading" and len(pieces) > 2):
            self.groups.tie(pieces if kind == "equal" else pieces[:-1], f"{node.name} makes pieces of one width")
        if stored:
            total = self.groups.total(layout)
            leaves = self.groups.expand(layout)
            boundaries = [(at, self._prefix(leaves, at)) for at in sorted({*stored, total}) if 0 < at <= total]
            self.slices.append(SliceSite(owner, boundaries, kind, pieces))
        return [(axis, piece) for piece in pieces]

    def cut_layout(self, layout: Layout, sizes: Sequence[int]) -> List[Layout]:
        """Cut ``layout`` into pieces of ``sizes`` channels (they add up to its width): each piece's layout."""
        for at in list(itertools.accumulate(sizes))[:-1]:
            self.groups.cut(layout, at)
        leaves, pieces, i = self.groups.expand(layout), [], 0
        for size in sizes:
            piece, width = [], 0
            while width < size:
                piece.append(leaves[i])
                width, i = width + self.groups.width[leaves[i]], i + 1
            pieces.append(tuple(piece))
        return pieces

    def equal_pieces(self, step: Step, count: int) -> Optional[Layout]:
        """Cut ``step.src`` into ``count`` equal pieces that keep one width (merged: the layout of one piece)."""
        pieces = self.cut(step, [self.groups.total(step.src[1]) // count] * count, "equal", ())
        return None if pieces is None else self.groups.union_layouts(self.groups.align([piece for _, piece in pieces]))

    def stored(self, step: Step, old: int, layout: Layout) -> bool:
        """A width ``old`` a block stores (``view(B, self.num_heads, ...)``), now that of ``layout``:
        followed when the block has a handler, which rewrites it; the site is recorded."""
        owner, _ = block_owner(step.node, self.root)
        if owner is not None:
            self.slices.append(SliceSite(owner, [(old, self.groups.expand(layout))]))
        return owner is not None

    def _prefix(self, leaves: Sequence[int], at: int) -> tuple:
        widths = itertools.accumulate(self.groups.width[g] for g in leaves)
        return tuple(g for g, end in zip(leaves, widths) if end <= at)

    # -- what rules record besides a node's layout -----------------------------------------------------
    def set_layout(self, node: fx.Node, located: Optional[Located]) -> Optional[Located]:
        """Set ``node``'s layout now (before its rule returns: later steps of the same rule read it); returns it."""
        self.layout[node] = located
        return located

    def record_layer(self, name: str, inputs: Optional[Layout] = None, outputs: Optional[Layout] = None) -> None:
        """Layer ``name`` reads ``inputs`` and produces ``outputs`` (its channels, resized with those groups)."""
        if inputs is not None:
            self.inputs[name] = inputs
        if outputs is not None:
            self.outputs[name] = outputs

    def add_parameter(self, path: str, dim: int, group: int) -> None:
        """Parameter ``path``'s dim ``dim`` holds the channels of ``group`` (resized with it)."""
        self.parameters[path] = (dim, group)

    def add_slice(self, site: SliceSite) -> None:
        """A split or slice at sizes a block stores: its block handler rewrites them after re-widening."""
        self.slices.append(site)

    def set_pieces(self, node: fx.Node, pieces: List[Optional[Located]]) -> None:
        """The layouts of the pieces a split/chunk (or a layer returning a tuple) makes; ``x[i]`` reads them."""
        self.pieces[node] = pieces

    def set_spread(self, node: fx.Node, entries: int) -> None:
        """``node``'s channels were flattened with the pixels: each spans ``entries`` consecutive entries."""
        self.spread[node] = entries

    def read_flattened(self, layer: str, entries: int) -> None:
        """Layer ``layer`` reads channels flattened over ``entries`` entries each (a classifier after flatten)."""
        self.spreads[layer] = entries

    def unflatten(self, node: fx.Node, why: str) -> None:
        """Stop following ``node``'s flattened channels: they are fixed, and a new fixed group takes their place."""
        axis = self.layout[node][0]
        self.fix_all([self.layout[node]], why)
        self.layout[node] = (axis, (self.groups.new(int(shape_of(node)[axis]), why),))
        del self.spread[node]

    def float_parameter(self, node: fx.Node, root: fx.Node) -> None:
        """``node`` is parameter ``root`` expanded or cast, its channel dim not known yet."""
        self.floating[node] = root

    def parameter(self, node: fx.Node, shape: Optional[torch.Size]) -> Optional[Located]:
        """A parameter with one channel-sized dim (LayerScale gamma) joins whatever it meets; a layer's
        own weight or bias (read by ``F.linear(x, layer.weight)``) is resized with its layer."""
        owner = self.model.get_submodule(node.target.rpartition(".")[0]) if "." in node.target else self.model
        big = [d for d, size in enumerate(shape or ()) if size > 1]
        return self.parameter_group(node, big[0]) if len(big) == 1 and channel_handler(owner) is None else None

    def table_parameter(self, node: fx.Node) -> Located:
        """A table looked up by a tensor index (relative position bias): its last dim gets a group."""
        return self.parameter_group(node, len(shape_of(node)) - 1)

    def parameter_group(self, node: fx.Node, dim: int) -> Located:
        """A new group for dim ``dim`` of the parameter ``node`` reads (resized with it)."""
        gid = self.groups.new(int(shape_of(node)[dim]))
        self.parameters[node.target] = (dim, gid)
        self.layout[node] = dim, (gid,)
        return self.layout[node]

    def check_width(self, node: fx.Node, shape: Optional[torch.Size]) -> None:
        """A layout whose channels do not add up to the traced width is fixed."""
        lo = self.layout.get(node)
        if (
            lo is not None
            and shape is not None
            and len(shape) > lo[0]
            and self.groups.total(lo[1]) * self.spread.get(node, 1) != shape[lo[0]]
        ):
            self.fix_all([lo], f"{node.name}: traced channel layout does not add up to {shape[lo[0]]} channels")
