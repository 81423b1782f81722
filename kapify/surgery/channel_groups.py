"""Channel dependency analysis: which layers' channel counts must change together.

The model is traced with kapify's FX tracer and run once with an example input (shapes). Each
tensor's channel axis (dim 1) belongs to a *channel group*: a conv/linear output starts a group;
channel-wise layers (BatchNorm), activations, pools and depthwise/grouped convs with equal in and
out channels pass it on (widening adds whole groups, so the width stays a multiple of the group width); a residual add
or a multiply (squeeze-excitation) merges the groups of its operands; a concat along dim 1 gives a
tensor made of several groups' segments. A group touching anything else (reshape, permute, matmul,
a parameter used directly, a layer without a channel handler, the model's input or output) is
*fixed*: its width cannot change, and the reason names the node.
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
from .tracing import eval_mode, example_input as default_input, trace

__all__ = ["ChannelGroup", "ChannelGraph", "channel_groups", "analyze_channels"]

Layout = Tuple[int, ...]  # the channel axis of a tensor: segments, each one group id

_ELEMENTWISE = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub, operator.truediv,
    torch.add, torch.mul, torch.sub, torch.div, torch.relu, torch.sigmoid, torch.tanh, torch.clamp,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.leaky_relu, F.elu, F.mish,
    F.dropout, F.dropout2d, F.hardtanh,
}
try:  # torchvision's per-sample drop path (EfficientNet, ConvNeXt, ...) scales whole examples
    from torchvision.ops import stochastic_depth

    _ELEMENTWISE.add(stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
_ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "div", "relu", "relu_", "sigmoid", "sigmoid_", "tanh",
                        "clamp", "clamp_", "contiguous", "float", "to", "type_as", "hardswish", "exp", "neg"}
_SPATIAL = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.interpolate,
            F.adaptive_avg_pool1d, F.avg_pool1d, F.max_pool1d}


@dataclass
class ChannelGroup:
    """Channels that must keep one width: who produces, reads and carries them."""

    id: int
    width: int
    producers: List[str] = field(default_factory=list)   # conv/linear modules whose outputs are these channels
    consumers: List[str] = field(default_factory=list)   # conv/linear modules reading them as inputs
    channelwise: List[str] = field(default_factory=list)  # BatchNorm, depthwise convs, ...
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
    gm = trace(model, tuple(leaf_modules) + tuple(handled))
    x = example_input if example_input is not None else default_input(model)
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(x)
    uf = _UnionFind()
    layout: Dict[fx.Node, Optional[Layout]] = {}
    inputs: Dict[str, Layout] = {}
    outputs: Dict[str, int] = {}
    roles: Dict[str, List[Tuple[str, Layout]]] = {}

    def lay(arg: Any) -> Optional[Layout]:
        return layout.get(arg) if isinstance(arg, fx.Node) else None

    def fix_all(layouts: Iterable[Optional[Layout]], why: str) -> None:
        for lo in layouts:
            for g in lo or ():
                uf.fix(g, why)

    def fresh(node: fx.Node, why: str) -> Optional[Layout]:
        shape = _shape(node)
        return (uf.new(int(shape[1]), why),) if shape is not None and len(shape) >= 2 else None

    def merge(layouts: List[Layout], node: fx.Node) -> Optional[Layout]:
        wide = [lo for lo in layouts if lo is not None]
        if not wide:
            return None
        if len({len(lo) for lo in wide}) > 1:
            fix_all(wide, f"operands of {node.name} are laid out differently")
            return wide[0]
        merged = list(wide[0])
        for lo in wide[1:]:
            merged = [uf.union(a, b) for a, b in zip(merged, lo)]
        return tuple(merged)

    for node in gm.graph.nodes:
        tensor_args: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), tensor_args.append)  # nodes inside lists too (torch.cat([a, b]))
        shape = _shape(node)
        if node.op == "placeholder":
            layout[node] = fresh(node, "model input")
        elif node.op == "get_attr":
            layout[node] = None
            node.meta["kapify_param"] = True
        elif node.op == "output":
            fix_all(_flat_layouts(node.args, layout), "model output")
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            handler = channel_handler(module)
            src = lay(node.args[0]) if node.args else None
            if handler is None:
                has_state = any(t.dim() > 0 for t in list(module.parameters(recurse=True)) + list(module.buffers(recurse=True)))
                in_shape = _shape(node.args[0]) if node.args else None
                keeps = shape is not None and in_shape is not None and len(shape) >= 2 and shape[1] == in_shape[1]
                if not has_state and keeps and src is not None:
                    layout[node] = src
                else:
                    fix_all([lay(a) for a in tensor_args], f"{type(module).__name__} '{node.target}' has no channel handler")
                    layout[node] = fresh(node, f"output of {type(module).__name__} '{node.target}'")
                continue
            if src is None:
                layout[node] = fresh(node, f"input of '{node.target}' has no traced channel layout")
                continue
            if handler.kind == "channelwise":
                roles.setdefault(node.target, []).append(("channelwise", src))
                if handler.channels_normalised:  # GroupNorm: widths stay multiples of its groups; statistics mix channels
                    for g in src:
                        root = uf.find(g)
                        uf.divisor[root] = math.lcm(uf.divisor.get(root, 1), getattr(module, "num_groups", 1))
                        uf.normalised.add(root)
                layout[node] = src
                continue
            groups = getattr(module, "groups", 1)
            c_in, c_out = getattr(module, handler.in_attr), getattr(module, handler.out_attr)
            if handler.kind == "linear" and (shape is None or len(shape) != 2):
                fix_all([src], f"Linear '{node.target}' applied to a tensor of rank {len(shape or ())}")
                layout[node] = fresh(node, f"output of Linear '{node.target}'")
                continue
            if groups > 1 and c_in == c_out:  # depthwise / grouped: channel i in feeds group of channel i out
                if len(src) != 1:
                    fix_all([src], f"grouped conv '{node.target}' reads a concatenation")
                else:  # widening adds whole groups: the width stays a multiple of the group width
                    root = uf.find(src[0])
                    uf.divisor[root] = math.lcm(uf.divisor.get(root, 1), c_in // groups)
                roles.setdefault(node.target, []).append(("grouped", src))
                layout[node] = src
                continue
            if groups > 1:
                fix_all([src], f"grouped conv '{node.target}' with {c_in} in and {c_out} out channels")
                layout[node] = fresh(node, f"output of grouped conv '{node.target}' ({c_in} -> {c_out} channels)")
                continue
            if handler.channels_normalised:  # weight standardisation over the input channels
                for g in src:
                    uf.normalised.add(uf.find(g))
            inputs[node.target] = src
            out = uf.new(c_out)
            outputs[node.target] = out
            roles.setdefault(node.target, []).append(("conv", src))
            layout[node] = (out,)
        else:  # call_function / call_method
            target = node.target
            layouts = [lay(a) for a in tensor_args]
            params = [a for a in tensor_args if a.op == "get_attr" and (_shape(a) is None or math.prod(_shape(a)) > 1)]
            if params:
                fix_all(layouts, f"{node.name} uses parameter '{params[0].target}' directly")
                layout[node] = fresh(node, f"output of {node.name}")
            elif target in _ELEMENTWISE or (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
                wide = [lo for a, lo in zip(tensor_args, layouts) if lo is not None and (_shape(a) or (0, 0))[1] > 1]
                layout[node] = merge(wide, node) if wide else (layouts[0] if layouts else None)
            elif target in _SPATIAL or (node.op == "call_method" and target in ("mean", "amax", "sum", "flatten")) \
                    or target in (torch.flatten, torch.mean):
                src_shape = _shape(tensor_args[0]) if tensor_args else None
                keeps = shape is not None and src_shape is not None and len(shape) >= 2 and shape[1] == src_shape[1]
                if target in (torch.flatten, "flatten") and src_shape is not None and len(src_shape) > 2:
                    keeps = keeps and math.prod(src_shape[2:]) == 1
                if keeps and layouts and layouts[0] is not None:
                    layout[node] = layouts[0]
                else:
                    fix_all(layouts, f"{node.name} ({_name(target)}) changes the channel axis")
                    layout[node] = fresh(node, f"output of {node.name}")
            elif target in (torch.cat, torch.concat) and _cat_dim(node) == 1 and layouts and all(lo is not None for lo in layouts):
                layout[node] = tuple(g for lo in layouts for g in lo)
            elif target in (getattr, operator.getitem) and shape is None:
                layout[node] = None
            elif node.op == "call_method" and target in ("size", "dim"):
                layout[node] = None
            else:
                fix_all(layouts, f"{node.name} ({_name(target)}) is not channel-aware")
                layout[node] = fresh(node, f"output of {node.name} ({_name(target)})")
        lo = layout.get(node)
        if lo is not None and shape is not None and len(shape) >= 2 and sum(uf.width[uf.find(g)] for g in lo) != shape[1]:
            fix_all([lo], f"{node.name}: traced channel layout does not add up to {shape[1]} channels")

    return _collect(uf, inputs, outputs, roles)


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


def _collect(uf: _UnionFind, inputs: Dict[str, Layout], outputs: Dict[str, int],
             roles: Dict[str, List[Tuple[str, Layout]]]) -> ChannelGraph:
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
    return ChannelGraph(
        groups=groups,
        inputs={n: tuple(renum(g) for g in lo) for n, lo in inputs.items()},
        outputs={n: renum(g) for n, g in outputs.items()},
        channelwise={n: tuple(renum(g) for g in lo) for n, entries in roles.items() for role, lo in entries if role != "conv"},
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
