"""Channel dependency analysis: which layers' channel counts must change together.

The model is traced with kapify's FX tracer and run once with an example input (shapes). Each
tensor's channel axis (dim 1) belongs to a *channel group*: a conv/linear output starts a group;
channel-wise layers (BatchNorm), activations, pools and depthwise/grouped convs with equal in and
out channels pass it on (widening adds whole groups, so the width stays a multiple of the group width); a residual add
or a multiply (squeeze-excitation) merges the groups of its operands; a concat along dim 1 gives a
tensor made of several groups' segments. The channel axis is followed through permutes, transposes
and reshapes (ConvNeXt's channels-last blocks: LayerNorm and Linear on the last dim), indexing of
other dims (a ViT's ``x[:, 0]``), padding and rolling of pixels (Swin) and timm's window/grid
reverse functions. A parameter joins the group it meets on the dim lined up with the channels
(LayerScale's gamma; a ViT's pos_embed and its expanded cls/register tokens).
Statistics over the channels (LayerNorm, GroupNorm, a mean over dim 1, ECA's Conv1d sliding along
them) mark the group *normalised*: it can widen, but new channels change the old ones' outputs.
A group touching anything else (a reshape that splits channels, matmul, a parameter used directly,
a layer without a channel handler, the model's input or output) is *fixed*: its width cannot
change, and the reason names the node.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .resize import channel_handler
from .tracing import _timm_settings, check_graph, eval_mode, example_input as default_input, trace

__all__ = ["ChannelGroup", "ChannelGraph", "channel_groups", "analyze_channels"]

Layout = Tuple[int, ...]  # the channel axis of a tensor: segments, each one group id

_ELEMENTWISE = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub, operator.truediv,
    torch.add, torch.mul, torch.sub, torch.div, torch.addcmul, torch.relu, torch.sigmoid, torch.tanh, torch.clamp,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.leaky_relu, F.elu, F.mish,
    F.dropout, F.dropout2d, F.hardtanh,
}
try:  # torchvision's per-sample drop path (EfficientNet, ConvNeXt, ...) scales whole examples
    from torchvision.ops import stochastic_depth

    _ELEMENTWISE.add(stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
_ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "div", "relu", "relu_", "sigmoid", "sigmoid_", "tanh",
                        "clamp", "clamp_", "hardswish", "exp", "neg", "addcmul",
                        "expand", "expand_as"}  # broadcasting
_FLOATING_METHODS = {"expand", "expand_as", "contiguous", "to", "type_as", "float", "half", "bfloat16"}  # keep trailing dims
_PIXEL_SHUFFLING_FUNCTIONS = {  # timm's untraced functions that move pixels, never channels (same dim from the right)
    "window_reverse": "Swin, MaxViT, DaViT: windows back to an NHWC image",
    "window_reverse_nchw": "MaxViT: windows back to an NCHW image",
    "grid_reverse": "MaxViT: grid attention cells back to an NHWC image",
    "grid_reverse_nchw": "MaxViT: grid attention cells back to an NCHW image",
    "deblockify": "NesT: blocks back to an NHWC image",
}
_CAST_METHODS = {"contiguous", "float", "half", "bfloat16", "to", "type_as", "clone", "detach"}  # the first operand, recast
_SPATIAL = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.interpolate,
            F.adaptive_avg_pool1d, F.avg_pool1d, F.max_pool1d}


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


class _UnionFind:
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
        div = math.lcm(self.divisor.get(a, 1), self.divisor.get(b, 1))
        self.divisor[a] = div
        return a

    def fix(self, g: int, why: str) -> None:
        self.fixed.setdefault(self.find(g), why)


def _shape(node: Any) -> Optional[torch.Size]:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def analyze_channels(model: nn.Module, example_input: Optional[torch.Tensor] = None,
                     leaf_modules: Iterable[type] = ()) -> ChannelGraph:
    """Trace ``model`` and return its :class:`ChannelGraph` (see the module docstring)."""
    handled = {type(m) for m in model.modules() if channel_handler(m) is not None}  # e.g. timm's Linear: a leaf, not F.linear
    x = example_input if example_input is not None else default_input(model)
    gm = _shaped_graph(model, tuple(leaf_modules) + tuple(handled), x)
    uf = _UnionFind()
    layout: Dict[fx.Node, Optional[_Located]] = {}
    inputs: Dict[str, Layout] = {}
    outputs: Dict[str, int] = {}
    roles: Dict[str, List[Tuple[str, Layout]]] = {}
    parameters: Dict[str, Tuple[int, int]] = {}  # parameter path -> (its channel dim, its group)
    floating: Dict[fx.Node, fx.Node] = {}  # an expanded/cast parameter whose channel dim is not known yet -> its get_attr
    spread: Dict[fx.Node, int] = {}  # a flattened tensor whose channels span k consecutive entries each
    spreads: Dict[str, int] = {}  # the linear layers reading such tensors

    def lay(arg: Any) -> Optional[_Located]:
        return layout.get(arg) if isinstance(arg, fx.Node) else None

    def fix_all(located: Iterable[Optional[_Located]], why: str) -> None:
        for lo in located:
            for g in lo[1] if lo else ():
                uf.fix(g, why)

    def fresh(node: fx.Node, why: str) -> Optional[_Located]:
        shape = _shape(node)
        return (1, (uf.new(int(shape[1]), why),)) if shape is not None and len(shape) >= 2 else None

    def merge(operands: List[Tuple[fx.Node, _Located]], node: fx.Node) -> Optional[_Located]:
        """Broadcasting ops: channel dims must line up counted from the right, segments must match."""
        offsets = {len(_shape(a)) - lo[0] for a, lo in operands}
        if len(offsets) > 1 or len({len(lo[1]) for _, lo in operands}) > 1 or len(_shape(node) or ()) < max(offsets):
            fix_all([lo for _, lo in operands], f"operands of {node.name} are laid out differently")
            return fresh(node, f"output of {node.name}")
        merged = list(operands[0][1][1])
        for _, lo in operands[1:]:
            merged = [uf.union(a, b) for a, b in zip(merged, lo[1])]
        return len(_shape(node)) - offsets.pop(), tuple(merged)

    def moved(node: fx.Node, src: Optional[_Located], axis: Optional[int], what: str) -> Optional[_Located]:
        """The channels moved to ``axis`` (None: they did not survive the op: their groups become fixed)."""
        if src is None:
            return None
        if axis is None:
            fix_all([src], f"{what} ({_name(node.target)}) changes the channel axis")
            return fresh(node, f"output of {what}")
        return axis, src[1]

    def pinned(node: fx.Node, module: nn.Module, handler: ChannelHandler) -> None:
        """A layer that produces channels the analysis cannot widen: its fixed group still names it, when
        that group is the layer's own output axis (not the tokens of a Linear's (N, tokens, C) output)."""
        lo, shape = layout.get(node), _shape(node)
        if lo is not None and len(lo[1]) == 1 and shape is not None and lo[0] == handler.axis % len(shape) \
                and uf.width[uf.find(lo[1][0])] == handler.count(module, handler.out_attr):
            outputs[node.target] = lo[1][0]

    def lined_up(param: fx.Node, other: Tuple[fx.Node, _Located]) -> Optional[_Located]:
        """A parameter with several dims > 1 (ViT's pos_embed: tokens x C) meeting a laid-out operand
        of a broadcasting op takes the dim lined up with its channels (counted from the right)."""
        (node, (axis, segments)), pshape = other, _shape(param)
        root = floating.get(param, param)  # the get_attr node a cls/reg token expand comes from
        dim = len(pshape) - (len(_shape(node)) - axis)
        root_dim = dim - (len(pshape) - len(_shape(root)))
        if len(segments) != 1 or not 0 <= root_dim < len(_shape(root)) or _shape(root)[root_dim] != _shape(node)[axis]:
            return None
        known = parameters.get(root.target)
        if known is not None and known[0] != root_dim:
            return None
        gid = known[1] if known is not None else uf.new(int(_shape(root)[root_dim]))
        parameters[root.target] = (root_dim, gid)
        layout[param] = (dim, (gid,))
        return layout[param]

    for node in gm.graph.nodes:
        tensor_args: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), tensor_args.append)  # nodes inside lists too (torch.cat([a, b]))
        shape = _shape(node)
        src = lay(tensor_args[0]) if tensor_args else None
        src_shape = _shape(tensor_args[0]) if tensor_args else None
        spread_src = next((a for a in tensor_args if a in spread), None)
        if spread_src is not None and shape is not None and node.op != "output":  # VGG: flatten, dropout, classifier
            handler = channel_handler(gm.get_submodule(node.target)) if node.op == "call_module" else None
            single = len(tensor_args) == 1  # then src is the flattened tensor
            if single and handler is not None and handler.kind == "linear" and handler.axis % len(src_shape) == src[0]:
                spreads[node.target] = spread[spread_src]  # then read as usual, below
            elif single and shape == src_shape and _keeps_every_entry(node, gm):
                layout[node], spread[node] = src, spread[spread_src]
                continue
            else:  # anything else sees an untracked, fixed axis (a conv after it still produces free channels)
                why = f"{node.name} reads channels flattened over {spread[spread_src]} entries each"
                for flat in [a for a in tensor_args if a in spread]:
                    fix_all([layout[flat]], why)
                    layout[flat] = (layout[flat][0], (uf.new(int(_shape(flat)[layout[flat][0]]), why),))
                    del spread[flat]
                src = lay(tensor_args[0])
        if node.op == "placeholder":
            layout[node] = fresh(node, "model input")
        elif node.op == "get_attr":  # a parameter with one channel-sized dim (LayerScale gamma) joins whatever it meets
            big = [d for d, size in enumerate(shape or ()) if size > 1]
            layout[node] = None
            if len(big) == 1:
                gid = uf.new(int(shape[big[0]]))
                layout[node] = (big[0], (gid,))
                parameters[node.target] = (big[0], gid)
        elif node.op == "output":
            fix_all(_flat_layouts(node.args, layout), "model output")
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            handler = channel_handler(module)
            if handler is None:
                has_state = any(t.dim() > 0 for t in list(module.parameters(recurse=True)) + list(module.buffers(recurse=True)))
                if isinstance(module, _Permute) and src is not None:
                    layout[node] = moved(node, src, _permuted_axis(src[0], module.dims, len(src_shape)), node.name)
                elif not has_state and src is not None and shape is not None and src_shape is not None:
                    layout[node] = moved(node, src, _follow_axis(src_shape, shape, src[0]), node.name)
                else:
                    fix_all([lay(a) for a in tensor_args], f"{type(module).__name__} '{node.target}' has no channel handler")
                    layout[node] = fresh(node, f"output of {type(module).__name__} '{node.target}'")
                continue
            if src is None:
                layout[node] = fresh(node, f"input of '{node.target}' has no traced channel layout")
                pinned(node, module, handler)
                continue
            axis = handler.axis % len(src_shape)
            multi = [a for a in (handler.in_attr, handler.out_attr) if isinstance(getattr(module, a), (tuple, list)) and len(getattr(module, a)) != 1]
            if multi:  # e.g. LayerNorm over (C, H, W): not one channel dim
                fix_all([src], f"{type(module).__name__} '{node.target}' has a multi-dim {multi[0]}")
                layout[node] = fresh(node, f"output of {type(module).__name__} '{node.target}'")
                continue
            if handler.kind == "conv" and src[0] >= 2 and shape is not None and shape[src[0]] == src_shape[src[0]]:
                for g in src[1]:  # a conv sliding along the channels (ECA's Conv1d): any width runs, but the
                    uf.normalised.add(uf.find(g))  # last old channels see new neighbours instead of zero padding
                layout[node] = src
                continue
            if src[0] != axis and all(uf.find(g) in uf.fixed for g in src[1]):  # the traced axis was only a guess
                src = (axis, (uf.new(int(src_shape[axis]), f"input of '{node.target}' has no traced channel layout"),))
            if src[0] != axis:  # e.g. a Linear applied to a (N, tokens, C) tensor whose channels are on dim 1
                fix_all([src], f"{type(module).__name__} '{node.target}' reads dim {axis}, the channels are on dim {src[0]}")
                layout[node] = fresh(node, f"output of {type(module).__name__} '{node.target}', which reads dim {axis}")
                pinned(node, module, handler)
                continue
            if handler.kind == "channelwise":
                roles.setdefault(node.target, []).append(("channelwise", src[1]))
                if handler.channels_normalised:  # GroupNorm/LayerNorm: statistics mix channels; widths stay multiples of its groups
                    for g in src[1]:
                        root = uf.find(g)
                        uf.divisor[root] = math.lcm(uf.divisor.get(root, 1), getattr(module, "num_groups", 1))
                        uf.normalised.add(root)
                layout[node] = src
                continue
            groups = getattr(module, "groups", 1)
            c_in, c_out = handler.count(module, handler.in_attr), handler.count(module, handler.out_attr)
            if groups > 1 and c_in == c_out:  # depthwise / grouped: channel i in feeds group of channel i out
                if len(src[1]) != 1:
                    fix_all([src], f"grouped conv '{node.target}' reads a concatenation")
                else:  # widening adds whole groups: the width stays a multiple of the group width
                    root = uf.find(src[1][0])
                    uf.divisor[root] = math.lcm(uf.divisor.get(root, 1), c_in // groups)
                roles.setdefault(node.target, []).append(("grouped", src[1]))
                layout[node] = src
                continue
            if groups > 1:
                fix_all([src], f"grouped conv '{node.target}' with {c_in} in and {c_out} out channels")
                layout[node] = fresh(node, f"output of grouped conv '{node.target}' ({c_in} -> {c_out} channels)")
                pinned(node, module, handler)
                continue
            if handler.channels_normalised:  # weight standardisation over the input channels
                for g in src[1]:
                    uf.normalised.add(uf.find(g))
            inputs[node.target] = src[1]
            out = uf.new(c_out)
            outputs[node.target] = out
            roles.setdefault(node.target, []).append(("conv", src[1]))
            layout[node] = (axis, (out,))
        else:  # call_function / call_method
            target, method = node.target, node.op == "call_method"
            located = [(a, lay(a)) for a in tensor_args if lay(a) is not None]
            params = [a for a in tensor_args if (a.op == "get_attr" or a in floating) and lay(a) is None
                      and math.prod(_shape(a) or (2,)) > 1]
            if params and not located and method and target in _FLOATING_METHODS:  # cls_token.expand(N, -1, -1)
                floating[node] = floating.get(params[0], params[0])
                layout[node] = None
                continue
            joins = target in _ELEMENTWISE or (method and target in _ELEMENTWISE_METHODS) or (
                target in (torch.cat, torch.concat) and located and located[0][1][0] != _cat_dim(node))
            if params and located and joins:
                for param in params:
                    placed = lined_up(param, located[0])
                    if placed is not None:
                        located.append((param, placed))
                params = [a for a in params if lay(a) is None]
            if params:
                fix_all([lo for _, lo in located], f"{node.name} uses parameter '{params[0].target}' directly")
                layout[node] = fresh(node, f"output of {node.name}")
            elif method and target in _CAST_METHODS:
                layout[node] = src if shape is not None and shape == src_shape else moved(node, src, None, node.name)
            elif target in _ELEMENTWISE or (method and target in _ELEMENTWISE_METHODS):
                wide = [(a, lo) for a, lo in located if _shape(a)[lo[0]] > 1]  # size-1 channel dims broadcast
                layout[node] = merge(wide, node) if wide else (located[0][1] if located else None)
            elif target in (torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes"):
                dims = _permutation(node, len(src_shape)) if src is not None else None
                layout[node] = moved(node, src, None if dims is None else _permuted_axis(src[0], dims, len(src_shape)), node.name)
            elif target in (torch.flatten, torch.reshape) or (method and target in ("view", "reshape", "flatten")):
                axis = _follow_axis(src_shape, shape, src[0]) if src and shape else None
                flat = _flattened_axis(src_shape, shape, src[0]) if src and shape and axis is None else None
                if flat is not None:  # (N, C, H, W) -> (N, C*H*W): each channel spans H*W consecutive entries
                    axis, spread[node] = flat
                if axis is not None and _stored_width(node, axis):  # e.g. gamma.view(self.shape): breaks when widened
                    fix_all([src], f"{node.name} ({_name(target)}) hard-codes {shape[axis]} channels")
                layout[node] = moved(node, src, axis, node.name)
            elif target in _SPATIAL and src is not None and src[0] == 1:  # pools act on spatial dims only
                layout[node] = moved(node, src, 1 if shape is not None and shape[1] == src_shape[1] else None, node.name)
            elif _name(target) in _REDUCTIONS and (method or target in _REDUCTIONS.values()):
                reduced = _reduced_dims(node, len(src_shape)) if src is not None else None
                if src is not None and reduced is not None and src[0] in reduced[0]:  # statistics over the channels (GRN, CBAM)
                    for g in src[1]:
                        uf.normalised.add(uf.find(g))
                    layout[node] = None
                else:
                    axis = None if reduced is None else src[0] if reduced[1] else src[0] - sum(d < src[0] for d in reduced[0])
                    layout[node] = moved(node, src, axis, node.name)
            elif target in (torch.cat, torch.concat) and located and len(located) == len(tensor_args):
                dim = _cat_dim(node)
                if all(lo[0] == dim for _, lo in located):  # along the channels: the result is made of segments
                    layout[node] = (dim, tuple(g for _, lo in located for g in lo[1]))
                else:  # along another dim: the channels must match
                    layout[node] = merge(located, node)
            elif target in (getattr, operator.getitem) and shape is None:
                layout[node] = None
            elif target is operator.getitem and src is not None and src_shape is not None:  # x[:, 0]: the cls token
                layout[node] = moved(node, src, _indexed_axis(node.args[1], len(src_shape), src[0]), node.name)
            elif _name(target) in _PIXEL_SHUFFLING_FUNCTIONS and src is not None and shape is not None:
                axis = len(shape) - (len(src_shape) - src[0])
                kept = 0 <= axis < len(shape) and shape[axis] == src_shape[src[0]]
                layout[node] = moved(node, src, axis if kept else None, node.name)
            elif _name(target) == "roll" and src is not None and src_shape is not None:  # Swin's shifted windows
                dims = node.kwargs.get("dims", node.args[2] if len(node.args) > 2 else None)
                dims = dims if isinstance(dims, (list, tuple)) else [dims]
                keeps = all(isinstance(d, int) for d in dims) and src[0] not in {d % len(src_shape) for d in dims}
                layout[node] = moved(node, src, src[0] if keeps else None, node.name)
            elif _name(target) == "pad" and src is not None and src_shape is not None:  # Swin pads H and W of NHWC
                kept = _pads_only_other_dims(node, len(src_shape), src[0])
                layout[node] = moved(node, src, src[0] if kept else None, node.name)
            elif method and target in ("size", "dim"):
                layout[node] = None
            else:
                fix_all([lo for _, lo in located], f"{node.name} ({_name(target)}) is not channel-aware")
                layout[node] = fresh(node, f"output of {node.name} ({_name(target)})")
        lo = layout.get(node)
        if lo is not None and shape is not None and len(shape) > lo[0] and \
                sum(uf.width[uf.find(g)] for g in lo[1]) * spread.get(node, 1) != shape[lo[0]]:
            fix_all([lo], f"{node.name}: traced channel layout does not add up to {shape[lo[0]]} channels")

    return _collect(uf, inputs, outputs, roles, parameters, spreads)


def _shaped_graph(model: nn.Module, leaves: Tuple[type, ...], x: torch.Tensor) -> fx.GraphModule:
    """The traced graph with shapes. It first looks inside the blocks timm keeps whole for FX
    (NormFreeBlock: in-place ops), trusted only if it runs and matches eager; else timm's leaves."""
    def shaped(timm_leaves: bool) -> fx.GraphModule:
        gm = trace(model, leaves, timm_leaves=timm_leaves)
        with eval_mode(gm), torch.no_grad():
            ShapeProp(gm).propagate(x)
        return gm

    timm_blocks = tuple(_timm_settings()[0])
    if any(isinstance(m, timm_blocks) and not isinstance(m, leaves) for m in model.modules()):
        try:
            gm = shaped(timm_leaves=False)
            if check_graph(gm, model, [x]) is None:
                return gm
        except Exception:  # noqa: BLE001 - any failure: use timm's own tracing settings
            pass
    return shaped(timm_leaves=True)


_Located = Tuple[int, Layout]  # (the tensor dim holding the channels, its segments)
try:  # torchvision's ConvNeXt moves channels last with a Permute module
    from torchvision.ops.misc import Permute as _Permute
except ImportError:  # pragma: no cover - torchvision is a dependency
    class _Permute(nn.Module):  # type: ignore[no-redef]
        dims: List[int] = []


def _follow_axis(before: Sequence[int], after: Sequence[int], axis: int) -> Optional[int]:
    """Where a reshape (view, flatten, ...) puts dim ``axis``: the output dim of the same size with
    as many elements before it (exact for row-major reshapes), else None."""
    outer = math.prod(before[:axis])
    for d, size in enumerate(after):
        if size == before[axis] and math.prod(after[:d]) == outer:
            return d
    return None


def _flattened_axis(before: Sequence[int], after: Sequence[int], axis: int) -> Optional[Tuple[int, int]]:
    """(output dim, entries per channel) when a reshape merges dim ``axis`` with the dims after it
    (channels outermost, as ``torch.flatten(x, 1)`` before a classifier), else None."""
    outer, size = math.prod(before[:axis]), before[axis]
    for d, merged in enumerate(after):
        if math.prod(after[:d]) == outer:
            for end in range(axis + 2, len(before) + 1):
                if math.prod(before[axis:end]) == merged and merged > size:
                    return d, merged // size
    return None


def _keeps_every_entry(node: fx.Node, gm: fx.GraphModule) -> bool:
    """An op that maps each entry to itself: dropout, activations, casts (safe on flattened channels)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        pointwise = (nn.Dropout, nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish)
        return isinstance(module, pointwise) and not any(True for _ in module.parameters())
    return node.target in _ELEMENTWISE or (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS | _CAST_METHODS)


def _indexed_axis(index: Any, ndim: int, axis: int) -> Optional[int]:
    """Where ``x[index]`` puts dim ``axis`` of ``x``: None if it indexes or slices the channels, or
    uses anything but ints, full-or-partial slices of other dims, None and one Ellipsis."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(i is Ellipsis for i in items) > 1 or not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(i is not None for i in items) - 1
        items[at:at + 1] = [slice(None)] * (ndim - used)
    items += [slice(None)] * (ndim - sum(i is not None for i in items))
    dim = out = 0
    for item in items:
        if item is None:
            out += 1
            continue
        if dim == axis:
            return out if item == slice(None) else None
        dim, out = dim + 1, out + (not isinstance(item, int))
    return None


def _pads_only_other_dims(node: fx.Node, ndim: int, axis: int) -> bool:
    """Whether ``F.pad(x, pad)`` leaves dim ``axis`` alone: its pair (counted from the last dim) is
    absent or literally (0, 0); the other pairs may be computed at run time."""
    pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(pad, (list, tuple)):
        return False
    at = 2 * (ndim - 1 - axis)
    return at >= len(pad) or (pad[at] == 0 and pad[at + 1] == 0 and not isinstance(pad[at], fx.Node))


def _permutation(node: fx.Node, ndim: int) -> Optional[List[int]]:
    """The dim order of a permute / transpose node."""
    args = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k in ("dims", "dim0", "dim1", "axis0", "axis1")]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    if not all(isinstance(a, int) for a in args):
        return None
    if _name(node.target) in ("transpose", "swapaxes"):
        order = list(range(ndim))
        a, b = (d % ndim for d in args)
        order[a], order[b] = order[b], order[a]
        return order
    return [d % ndim for d in args]


def _permuted_axis(axis: int, dims: Sequence[int], ndim: int) -> int:
    return [d % ndim for d in dims].index(axis)


_REDUCTIONS = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax, "amin": torch.amin, "norm": torch.norm}


def _reduced_dims(node: fx.Node, ndim: int) -> Optional[Tuple[set, bool]]:
    """(the dims a mean/sum/amax/amin/norm reduces, keepdim), None if not known from the graph."""
    first = 2 if _name(node.target) == "norm" else 1  # norm(input, p, dim, keepdim)
    dim = node.kwargs.get("dim", node.args[first] if len(node.args) > first else None)
    keepdim = node.kwargs.get("keepdim", node.args[first + 1] if len(node.args) > first + 1 else False)
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if dim is None or not isinstance(keepdim, bool) or not all(isinstance(d, int) for d in dims):
        return None
    return {d % ndim for d in dims}, keepdim


def _stored_width(node: fx.Node, axis: int) -> bool:
    """Whether a view/reshape writes the channel count at ``axis`` as a literal (from a stored
    attribute, not -1 or a size read off the tensor): widening would break it at run time."""
    if _name(node.target) not in ("view", "reshape"):
        return False
    sizes = list(node.args[2:] if node.op == "call_function" else node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    sizes = sizes or list(node.kwargs.get("shape", node.kwargs.get("size", ())))
    return axis < len(sizes) and isinstance(sizes[axis], int) and sizes[axis] > 1


def _flat_layouts(args: Any, layout: Dict[fx.Node, Optional[Layout]]) -> List[Optional[Layout]]:
    found: List[Optional[Layout]] = []
    fx.node.map_arg(args, lambda n: found.append(layout.get(n)))
    return found


def _cat_dim(node: fx.Node) -> int:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    shape = _shape(node)
    return dim + len(shape) if isinstance(dim, int) and dim < 0 and shape is not None else dim


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _collect(uf: _UnionFind, inputs: Dict[str, Layout], outputs: Dict[str, int], roles: Dict[str, List[Tuple[str, Layout]]],
             parameters: Dict[str, Tuple[int, int]], spreads: Dict[str, int]) -> ChannelGraph:
    roots = sorted({uf.find(g) for g in range(len(uf.parent))})
    index = {r: i for i, r in enumerate(roots)}
    groups = [ChannelGroup(id=i, width=uf.width[r], divisor=uf.divisor.get(r, 1), fixed=uf.fixed.get(r), normalised=r in uf.normalised)
              for i, r in enumerate(roots)]
    renum = lambda g: index[uf.find(g)]  # noqa: E731
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
