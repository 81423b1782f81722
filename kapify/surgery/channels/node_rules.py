"""Rules for functions and tensor methods: where each puts the channel axis, which groups merge.

A rule is one short function ``rule(analysis, step) -> layout``, registered for the call targets it
handles with :func:`register_node_rule` (functions by object, tensor methods by name, timm's untraced
helpers by ``__name__``). It returns the node's layout (``(axis, segments)``, or None for a
non-tensor), or ``NotImplemented`` when the node is outside what it knows: the channels are then
fixed ("... is not channel-aware"). A new op is one registered function:

    >>> import torch
    >>> @register_node_rule(torch.sign)
    ... def sign(analysis, step):
    ...     '''elementwise: the channels stay where they are'''
    ...     return step.src
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx

from ..handlers import channel_handler
from ..optional import optional_imports
from ..registry import Registry
from .axes import (
    REDUCTIONS,
    cat_dim,
    flattened_axis,
    follow_axis,
    merged_axis,
    name_of,
    pads_only_other_dims,
    permutation,
    permuted_axis,
    reduced_dims,
    reshape_sizes,
    shape_of,
    size_read,
    split_axis,
    stored_width,
)
from .blocks import counts_heads
from .context import ChannelAnalysis, Located, Step
from .graph import Layout

__all__ = ["NodeRule", "register_node_rule", "node_rule", "function_layout"]

NodeRule = Callable[[ChannelAnalysis, Step], Any]


@dataclass(frozen=True)
class NodeRuleEntry:
    """A rule for a call; ``parameters``: it places the parameters the call reads itself."""

    rule: NodeRule
    parameters: bool = False


#: call targets (functions, tensor method names, function names) -> the rule for the call
FUNCTION_RULES: Registry[NodeRuleEntry] = Registry("function rule")
METHOD_RULES: Registry[NodeRuleEntry] = Registry("method rule")
NAMED_RULES: Registry[NodeRuleEntry] = Registry("named function rule")


def register_node_rule(
    *functions: Callable,
    methods: Iterable[str] = (),
    names: Iterable[str] = (),
    parameters: bool = False,
    reason: str = "",
) -> Callable[[NodeRule], NodeRule]:
    """Register a rule for call targets: ``functions`` (``torch.cat``), tensor ``methods`` (``"view"``)
    and functions matched by ``names`` (timm's wrapped helpers, ``roll``). ``parameters=True``: the rule
    places the parameters the call reads itself (``F.linear(x, self.qkv.weight)``). Usable as a decorator."""

    def register(rule: NodeRule) -> NodeRule:
        entry = NodeRuleEntry(rule, parameters)
        for registry, keys in ((FUNCTION_RULES, functions), (METHOD_RULES, methods), (NAMED_RULES, names)):
            for key in keys:
                registry.add(key, entry, reason)
        return rule

    return register


def node_rule(node: fx.Node) -> Optional[NodeRuleEntry]:
    """The rule registered for a call_function / call_method node, or None."""
    if node.op == "call_method":
        return METHOD_RULES.get(node.target) or NAMED_RULES.get(node.target)
    return FUNCTION_RULES.get(node.target) or NAMED_RULES.get(name_of(node.target))


_ELEMENTWISE = {
    operator.add,
    operator.iadd,
    operator.neg,
    torch.neg,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.isub,
    operator.truediv,
    operator.pow,
    torch.pow,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
    torch.addcmul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.dropout,
    F.dropout2d,
    F.hardtanh,
}
# torchvision's per-sample drop path (EfficientNet, ConvNeXt, ...) scales whole examples
_ELEMENTWISE.update(
    optional_imports(
        "torchvision.ops:stochastic_depth", used_for="node rule: torchvision's stochastic_depth is elementwise"
    )
)
_ELEMENTWISE_METHODS = {
    "add",
    "add_",
    "mul",
    "mul_",
    "sub",
    "div",
    "pow",
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "clamp",
    "clamp_",
    "hardswish",
    "exp",
    "neg",
    "addcmul",
    "expand",
    "expand_as",
}  # broadcasting
_FLOATING_METHODS = {
    "expand",
    "expand_as",
    "contiguous",
    "to",
    "type_as",
    "float",
    "half",
    "bfloat16",
}  # keep trailing dims
_CAST_METHODS = {
    "contiguous",
    "float",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "clone",
    "detach",
}  # the first operand, recast
_PIXEL_SHUFFLING_FUNCTIONS = {  # timm's untraced functions that move pixels, never channels (same dim from the right)
    "window_reverse": "Swin, MaxViT, DaViT: windows back to an NHWC image",
    "window_reverse_nchw": "MaxViT: windows back to an NCHW image",
    "grid_reverse": "MaxViT: grid attention cells back to an NHWC image",
    "grid_reverse_nchw": "MaxViT: grid attention cells back to an NCHW image",
    "deblockify": "NesT: blocks back to an NHWC image",
}
_SPATIAL = {
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.avg_pool2d,
    F.max_pool2d,
    F.interpolate,
    F.adaptive_avg_pool1d,
    F.avg_pool1d,
    F.max_pool1d,
}


def _is_elementwise(node: fx.Node) -> bool:
    return node.target in _ELEMENTWISE if node.op == "call_function" else node.target in _ELEMENTWISE_METHODS


def function_layout(an: ChannelAnalysis, step: Step) -> Optional[Located]:
    """The layout of a call_function / call_method node: parameters it reads first, then its rule."""
    node = step.node
    step.located = [(a, an.lay(a)) for a in step.args if an.lay(a) is not None]
    params = [
        a
        for a in step.args
        if (a.op == "get_attr" or a in an.floating) and an.lay(a) is None and math.prod(shape_of(a) or (2,)) > 1
    ]
    leading = node.op == "call_method" and node.target == "unsqueeze" and node.args[1:] == (0,)  # a batch dim in front
    if params and not step.located and node.op == "call_method" and (node.target in _FLOATING_METHODS or leading):
        an.float_parameter(node, an.floating.get(params[0], params[0]))  # cls_token.expand(N, -1, -1), unsqueeze(0)
        return None
    if (
        node.target is operator.getitem
        and params == [node.args[0]]
        and isinstance(node.args[1], fx.Node)
        and len(shape_of(params[0]) or ()) >= 2
    ):  # table[index]: a bias/embedding table's last dim (heads) follows
        step.src = an.table_parameter(params[0])
        step.located, params = [(params[0], step.src)], []
    joins = _is_elementwise(node) or (
        node.target in (torch.cat, torch.concat) and step.located and step.located[0][1][0] != cat_dim(node)
    )
    if params and step.located and joins:
        offset = len(shape_of(step.located[0][0])) - step.located[0][1][0]  # a parameter short of the channel dim or of
        params = [
            a for a in params if len(shape_of(a) or ()) >= offset and shape_of(a)[-offset] > 1
        ]  # size 1 there broadcasts (RoPE, masks)
        for param in params:
            placed = an.lined_up(param, step.located[0])
            if placed is not None:
                step.located.append((param, placed))
        params = [a for a in params if an.lay(a) is None]
    entry = node_rule(node)
    if params and not (entry is not None and entry.parameters):
        an.fix_all([lo for _, lo in step.located], f"{node.name} uses parameter '{params[0].target}' directly")
        return an.fresh(node, f"output of {node.name}")
    result = entry.rule(an, step) if entry is not None else NotImplemented
    if result is NotImplemented:
        flat = next((an.spread[a] for a in step.args if a in an.spread), None)
        an.fix_all(
            [lo for _, lo in step.located],
            f"{node.name} ({name_of(node.target)}) "
            + (
                "is not channel-aware"
                if flat is None
                else f"reads channels flattened over {flat} entries each (a channel shuffle)"
            ),
        )
        return an.fresh(node, f"output of {node.name} ({name_of(node.target)})")
    return result


@register_node_rule(methods=_CAST_METHODS)
def cast(an: ChannelAnalysis, step: Step) -> Optional[Located]:
    """contiguous(), float(), to(...): the first operand, recast"""
    return (
        step.src
        if step.shape is not None and step.shape == step.src_shape
        else an.moved(step.node, step.src, None, step.node.name)
    )


@register_node_rule(*_ELEMENTWISE, methods=_ELEMENTWISE_METHODS)
def broadcasting(an: ChannelAnalysis, step: Step) -> Optional[Located]:
    """add, mul, activations: operands' channels merge (residual adds, squeeze-excitation); size-1 channel dims
    broadcast"""
    widest = max((shape_of(a)[lo[0]] for a, lo in step.located), default=0)
    wide = [(a, lo) for a, lo in step.located if shape_of(a)[lo[0]] == widest]  # a size-1 dim broadcasts only
    return an.merge(wide, step.node) if wide else None  # against a wider one: 1-channel operands add as channels


@register_node_rule(torch.permute, torch.transpose, torch.swapaxes, methods=("permute", "transpose", "swapaxes"))
def permute(an: ChannelAnalysis, step: Step) -> Optional[Located]:
    """permute/transpose: the channels move with their dim (ConvNeXt's channels-last blocks)"""
    src, ndim = step.src, len(step.src_shape or ())
    dims = permutation(step.node, ndim) if src is not None else None
    return an.moved(step.node, src, None if dims is None else permuted_axis(src[0], dims, ndim), step.node.name)


@register_node_rule(
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    methods=("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"),
)
def reshape(an: ChannelAnalysis, step: Step) -> Any:
    """view/reshape/flatten/(un)squeeze: followed when the channel dim survives whole, is flattened outermost
    (VGG's classifier), split into pieces (SKNet's paths) or heads (attention), or heads merge back"""
    node, src, shape = step.node, step.src, step.shape
    if src is None or shape is None:
        return an.moved(node, src, None, node.name)
    before, axis = step.src_shape, src[0]
    moved, flat = follow_axis(before, shape, axis), flattened_axis(before, shape, axis)
    merged, split = merged_axis(before, shape, axis), split_axis(before, shape, axis)
    if (
        moved == axis + 1
        and list(shape) == [*before[:axis], 1, *before[axis:]]
        and stored_width(node, axis, least=1)
        and counts_heads(node, an.root)
    ):  # (N, C) -> (N, 1, C) in attention: one head
        return _split(an, step, moved - 1, moved, 1)
    if moved is not None:
        located = (moved, src[1])
    elif flat is not None:  # (N, C, H, W) -> (N, C*H*W); (N, heads, d) -> (N, heads*d)
        located = _heads_together(an, src, *flat) or _spread(an, node, src, *flat)
    elif merged is not None:  # (N, h, d) -> (N, h*d) with the channels on d: h copies of them
        located = (merged[0], src[1] * merged[1])
    elif split is not None:
        return _split(an, step, *split)
    else:
        return an.moved(node, src, None, node.name)
    located = _size_coupled(an, node, located)
    if stored_width(node, located[0]) and not an.stored(
        step, int(shape[located[0]]), located[1]
    ):  # gamma.view(self.shape)
        an.fix_all([src], f"{node.name} ({name_of(node.target)}) hard-codes {shape[located[0]]} channels")
    return located


def _spread(an: ChannelAnalysis, node: fx.Node, src: Located, axis: int, entries: int) -> Located:
    """Channels flattened outermost: each spans ``entries`` consecutive entries (read in blocks)."""
    an.set_spread(node, entries)
    return axis, src[1]


def _split(an: ChannelAnalysis, step: Step, first: int, last: int, pieces: int) -> Any:
    """(N, C) -> (N, ..., d): with d computed, ``pieces`` equal pieces of d on the last dim; with d
    stored (or a stored head count in an attention block, see ``register_block_handler(heads=True)``), heads (N, k,
    h, d): k equal pieces (q, k, v) of h heads each, the channels on the heads dim."""
    node = step.node
    stored_heads = last - 1 >= first and stored_width(node, last - 1, least=1) and counts_heads(node, an.root)
    if not stored_width(node, last) and not stored_heads:  # widen d
        return _size_coupled(an, node, _pieces_together(an, step, last, pieces))
    if last - 1 < first:
        return an.moved(node, step.src, None, node.name)
    heads = int(step.shape[last - 1])
    lead = pieces // heads
    layout = step.src[1] if lead == 1 else an.equal_pieces(step, lead)
    if layout is None:  # the traced layout does not add up
        return NotImplemented
    if len(layout) != 1:
        return an.moved(node, step.src, None, node.name)
    _head_dim_coupled(an, node, last, heads, layout)
    return _heads(an, step, last - 1, heads, layout[0])


def _size_source(an: ChannelAnalysis, node: fx.Node, axis: int) -> Optional[Tuple[Layout, int, int]]:
    """(layout, num, den) when a view/reshape sizes dim ``axis`` at run time as num/den of the channel count of
    a laid-out tensor (``reshape(B, N, C)`` with ``B, N, C = x.shape``; ``C // self.num_heads``), else None."""
    sizes = reshape_sizes(node) if name_of(node.target) in ("view", "reshape") else []
    read = size_read(sizes[axis]) if axis < len(sizes) else None
    source = an.lay(read[0]) if read is not None else None
    if source is None or read[0] in an.spread or read[1] % len(shape_of(read[0])) != source[0]:
        return None
    return source[1], read[2], read[3]


def _head_dim_coupled(an: ChannelAnalysis, node: fx.Node, axis: int, heads: int, layout: Layout) -> None:
    """A head dim computed off another tensor (``C // self.num_heads`` with ``C = x.shape[-1]``): widening
    by whole heads keeps it only if that tensor's channels widen with the heads' (C = heads x d)."""
    found = _size_source(an, node, axis)
    if found is not None and found[1] * heads == found[2] and an.groups.total(found[0]) == an.groups.total(layout):
        an.groups.union_layouts(an.groups.align([layout, found[0]]))


def _heads(an: ChannelAnalysis, step: Step, axis: int, heads: int, group: int) -> Optional[Located]:
    """(N, h*d, ...) -> (N, h, d, ...) with a stored d: the heads dim carries the channels in whole heads
    of d; widening adds heads (their count, if stored, rewritten by the block's handler)."""
    node = step.node
    per_head = an.groups.width[an.groups.find(group)] // heads
    head = an.groups.new(heads)
    an.groups.multiply(group, head, per_head, 1)
    if stored_width(node, axis, least=1) and not an.stored(step, heads, (head,)):
        an.fix_all([step.src], f"{node.name} ({name_of(node.target)}) hard-codes {heads} heads")
    return axis, (head,)


def _heads_together(an: ChannelAnalysis, src: Located, axis: int, per_head: int) -> Optional[Located]:
    """(N, h, e) -> (N, h*e) with the channels on h, heads made by :func:`_heads` from channels with d per
    head: those channels (e = d), or new ones with e per head (LowFormer: q, k, v of 3e per head, then e)."""
    if len(src[1]) != 1:
        return None
    head = an.groups.find(src[1][0])
    came = [(inp, a) for inp, out, a, b in an.groups.multiplied if an.groups.find(out) == head and b == 1]
    if not came:
        return None
    inp, d = came[0]
    if d == per_head:
        return axis, an.groups.expand((inp,))
    merged = an.groups.new(an.groups.width[head] * per_head)
    an.groups.multiply(inp, merged, d, per_head)
    return axis, (merged,)


def _size_coupled(an: ChannelAnalysis, node: fx.Node, located: Any) -> Any:
    """A reshape whose channel dim is sized at run time off another tensor (``reshape(B, N, C)`` with
    ``B, N, C = x.shape``; ``C // self.num_heads``): its channels widen with that tensor's."""
    found = _size_source(an, node, located[0]) if isinstance(located, tuple) else None
    if found is None:
        return located
    if found[1] != 1 or node in an.spread or an.groups.total(located[1]) * found[2] != an.groups.total(found[0]):
        if not set(an.groups.expand(found[0])) <= set(an.groups.expand(located[1])):  # not these channels rearranged
            # (a channel shuffle): sized off other channels in a way the layouts cannot line up (LambdaLayer:
            # heads x dim_v flattened back to its input's C): neither may widen
            an.fix_all(
                [(located[0], found[0]), located],
                f"{node.name} ({name_of(node.target)}) sizes its channels off another tensor's count",
            )
        return located
    an.groups.union_layouts(an.groups.align([located[1] * found[2], found[0]]))
    return located[0], an.groups.expand(located[1])


def _pieces_together(an: ChannelAnalysis, step: Step, axis: int, count: int) -> Any:
    """The channels cut into ``count`` equal pieces that line up on dim ``axis`` (and merge there)."""
    piece = an.equal_pieces(step, count)
    return NotImplemented if piece is None else (axis, piece)  # None: the traced layout does not add up


@register_node_rule(F.scaled_dot_product_attention)
def attention(an: ChannelAnalysis, step: Step) -> Any:
    """scaled_dot_product_attention with the channels on the heads dim: q, k, v (and a per-head mask) merge;
    on the feature dim (one head over conv features, iFormer): q and k keep one width, the output has v's"""
    if step.located and all(lo[0] == len(shape_of(a)) - 1 for a, lo in step.located):
        return _feature_attention(an, step)
    if not step.located or any(lo[0] >= len(shape_of(a)) - 2 for a, lo in step.located):
        return NotImplemented  # channels on the token dim: not followed
    if _unfollowed_operand(step):
        return NotImplemented  # a mask with a heads dim the analysis did not follow
    return an.merge(step.located, step.node)


def _feature_attention(an: ChannelAnalysis, step: Step) -> Any:
    """Attention whose q, k, v carry their channels on the feature dim: q.k sums over q's and k's channels,
    scaled by 1/sqrt(their count) unless the call passes a scale: new ones change that scale, as new
    channels change a LayerNorm's statistics (the group is marked normalised); v's channels pass."""
    node = step.node
    if len(node.args) < 3 or an.lay(node.args[2]) is None or shape_of(node.args[0])[-1] != shape_of(node.args[1])[-1]:
        return NotImplemented  # q, k, v passed by keyword, or v not followed
    q, k = an.lay(node.args[0]), an.lay(node.args[1])
    if q is not None and k is not None:
        an.groups.union_layouts(an.groups.align([q[1], k[1]]))
    if "scale" not in node.kwargs:  # like a norm over them: function_preserving keeps them, convert widens them
        for g in (q[1] if q else ()) + (k[1] if k else ()):
            an.groups.normalise(g)
    return len(step.shape) - 1, an.lay(node.args[2])[1]


def _unfollowed_operand(step: Step) -> bool:
    """An operand without a layout that has a dim > 1 lined up with the channels of the others."""
    offset = len(shape_of(step.located[0][0])) - step.located[0][1][0]  # the channel dim, counted from the right
    located = {a for a, _ in step.located}
    return any(a not in located and len(shape_of(a) or ()) >= offset and shape_of(a)[-offset] > 1 for a in step.args)


@register_node_rule(torch.matmul, operator.matmul, methods=("matmul",))
def matmul(an: ChannelAnalysis, step: Step) -> Any:
    """matmul with the channels on a batch dim (attention heads: ``q @ k.transpose(-2, -1)``, ``attn @ v``): they
    merge; on the rows of the left operand or the columns of the right one (GCNet's ``x @ attn``): they stay; on
    the dim both contract (single-head attention's ``q.transpose(-2, -1) @ k``): they stay as they are, the
    output has none (new channels of both would enter every product)"""
    node = step.node
    wide = [
        (a, lo) for a, lo in step.located if an.groups.total(lo[1]) > 1
    ]  # one channel (GCNet's attention logits) broadcasts
    if (
        len(wide) == 2 == len(step.args)
        and [len(shape_of(a)) - lo[0] for a, lo in wide] == [1, 2]
        and wide[0][0] is node.args[0]
    ):
        an.fix_all(
            [lo for _, lo in wide], f"{node.name} (matmul) contracts these channels with others' (attention scores)"
        )
        return None
    if len(wide) == 2:  # a fixed operand's matrix dim (attention scores' tokens) needs no following
        wide = [
            (a, lo)
            for a, lo in wide
            if not (all(an.groups.is_fixed(g) for g in lo[1]) and len(shape_of(a)) - lo[0] <= 2)
        ] or wide
    if len(wide) == 1 and len(step.args) == 2 and step.shape is not None and len(step.shape) >= 2:
        ((a, (axis, layout)),) = wide
        from_right = len(shape_of(a)) - axis
        if (a is node.args[0] and from_right == 2) or (a is node.args[1] and from_right == 1 and a is not node.args[0]):
            return len(step.shape) - from_right, layout  # each output row (column) reads one row (column) of these
    if not step.located or any(lo[0] >= len(shape_of(a)) - 2 for a, lo in step.located):
        return NotImplemented  # channels on a matrix dim: contracted, not followed
    return NotImplemented if _unfollowed_operand(step) else an.merge(step.located, step.node)


@register_node_rule(torch.einsum)
def einsum(an: ChannelAnalysis, step: Step) -> Any:
    """einsum with the channels on a letter the output keeps (torchvision MaxViT's heads): they follow it, merged"""
    equation, operands = step.node.args[0], list(step.node.args[1:])
    operands = list(operands[0]) if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
    if not isinstance(equation, str) or "->" not in equation or "." in equation or not step.located:
        return NotImplemented
    terms, output = equation.replace(" ", "").split("->")
    terms = terms.split(",")
    if len(terms) != len(operands):
        return NotImplemented
    letters = {terms[operands.index(a)][lo[0]] for a, lo in step.located}
    letter = letters.pop() if len(letters) == 1 else None
    if (
        letter is None
        or letter not in output
        or any(
            a not in dict(step.located) and letter in term and shape_of(a)[term.index(letter)] > 1
            for a, term in zip(operands, terms)
        )
    ):
        return NotImplemented  # channels contracted, on different letters, or met by an operand not followed
    if len({an.groups.total(lo[1]) for _, lo in step.located}) > 1:
        return NotImplemented
    return output.index(letter), an.groups.union_layouts(an.groups.align([lo[1] for _, lo in step.located]))


@register_node_rule(torch.stack)
def stack(an: ChannelAnalysis, step: Step) -> Any:
    """stack: the operands' channels merge (SKNet's kernel paths); the channel dim moves past a new dim before it"""
    if not step.located or len(step.located) != len(step.args) or step.shape is None:
        return NotImplemented
    dim = step.node.kwargs.get("dim", step.node.args[1] if len(step.node.args) > 1 else 0)
    if not isinstance(dim, int):
        return NotImplemented
    merged = an.merge(step.located, step.node)
    axis = step.located[0][1][0]
    return merged if merged is None or dim % len(step.shape) <= axis else (axis, merged[1])


@register_node_rule(
    torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, F.normalize, methods=("softmax", "log_softmax")
)
def normalising(an: ChannelAnalysis, step: Step) -> Any:
    """softmax, F.normalize over another dim keep the channels (SKNet's path attention, cosine attention over
    the head dim); over the channels they normalise them"""
    at, default = (2, 1) if step.node.target is F.normalize else (1, None)  # normalize(input, p, dim=1)
    dim = step.node.kwargs.get("dim", step.node.args[at] if len(step.node.args) > at else default)
    if step.src is None or not isinstance(dim, int):
        return NotImplemented
    if dim % len(step.src_shape) == step.src[0]:
        for g in step.src[1]:
            an.groups.normalise(g)
    return step.src


@register_node_rule(torch.Tensor.repeat, methods=("repeat",))
def repeat(an: ChannelAnalysis, step: Step) -> Any:
    """repeat over other dims (XCiT's positional encoding over the batch) keeps the channels; over them it is not
    followed"""
    sizes = list(step.node.args[1:])
    sizes = list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes
    if step.src is None or step.shape is None or len(sizes) != len(step.src_shape) or sizes[step.src[0]] != 1:
        return NotImplemented
    return step.src


@register_node_rule(*_SPATIAL)
def spatial(an: ChannelAnalysis, step: Step) -> Any:
    """pools and interpolation act on the spatial dims of NCHW only"""
    if step.src is None or step.src[0] != 1:
        return NotImplemented
    kept = step.shape is not None and step.shape[1] == step.src_shape[1]
    return an.moved(step.node, step.src, 1 if kept else None, step.node.name)


@register_node_rule(*REDUCTIONS.values(), methods=REDUCTIONS)
def reduction(an: ChannelAnalysis, step: Step) -> Optional[Located]:
    """mean/sum/amax/amin/norm: over other dims the channels survive; over the channels they are statistics (GRN,
    CBAM)"""
    src = step.src
    reduced = reduced_dims(step.node, len(step.src_shape)) if src is not None else None
    if src is not None and reduced is not None and src[0] in reduced[0]:
        for g in src[1]:
            an.groups.normalise(g)
        return None
    axis = None if reduced is None else src[0] if reduced[1] else src[0] - sum(d < src[0] for d in reduced[0])
    return an.moved(step.node, src, axis, step.node.name)


@register_node_rule(torch.cat, torch.concat)
def concat(an: ChannelAnalysis, step: Step) -> Any:
    """cat along the channels: a tensor made of its operands' segments (DenseNet); along another dim: channels merge"""
    if not step.located or len(step.located) != len(step.args):
        return NotImplemented
    dim = cat_dim(step.node)
    if all(lo[0] == dim for _, lo in step.located):
        return dim, tuple(g for _, lo in step.located for g in lo[1])
    return an.merge(step.located, step.node)


@register_node_rule(names=_PIXEL_SHUFFLING_FUNCTIONS)
def pixel_shuffling(an: ChannelAnalysis, step: Step) -> Any:
    """timm's window/grid reverse functions move pixels, never channels (same dim from the right)"""
    if step.src is None or step.shape is None:
        return NotImplemented
    axis = len(step.shape) - (len(step.src_shape) - step.src[0])
    kept = 0 <= axis < len(step.shape) and step.shape[axis] == step.src_shape[step.src[0]]
    return an.moved(step.node, step.src, axis if kept else None, step.node.name)


@register_node_rule(names=("_patch_merging_pad",))
def patch_merging(an: ChannelAnalysis, step: Step) -> Any:
    """torchvision's Swin: the four pixels of each 2x2 patch of an NHWC image side by side (4 x the channels)"""
    src = step.src
    if (
        src is None
        or step.shape is None
        or src[0] != len(step.src_shape) - 1
        or step.shape[-1] != 4 * step.src_shape[-1]
    ):
        return NotImplemented
    return src[0], src[1] * 4


@register_node_rule(names=("roll",))
def roll(an: ChannelAnalysis, step: Step) -> Any:
    """torch.roll of pixels (Swin's shifted windows); rolling the channels is not followed"""
    node, src = step.node, step.src
    if src is None or step.src_shape is None:
        return NotImplemented
    dims = node.kwargs.get("dims", node.args[2] if len(node.args) > 2 else None)
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    keeps = all(isinstance(d, int) for d in dims) and src[0] not in {d % len(step.src_shape) for d in dims}
    return an.moved(node, src, src[0] if keeps else None, node.name)


@register_node_rule(names=("pad",))
def pad(an: ChannelAnalysis, step: Step) -> Any:
    """F.pad of other dims (Swin pads H and W of NHWC); padding the channels is not followed"""
    if step.src is None or step.src_shape is None:
        return NotImplemented
    kept = pads_only_other_dims(step.node, len(step.src_shape), step.src[0])
    return an.moved(step.node, step.src, step.src[0] if kept else None, step.node.name)


@register_node_rule(methods=("size", "dim"))
def metadata(an: ChannelAnalysis, step: Step) -> None:
    """x.size(), x.dim(): not tensors"""
    return None


def through_flattened(an: ChannelAnalysis, step: Step) -> bool:
    """A node reading a tensor whose channels were flattened with the pixels (VGG: flatten, dropout,
    classifier). True when the node is fully handled here; else the visit goes on as usual."""
    node, args = step.node, step.args
    spread_src = next(a for a in args if a in an.spread)
    module = an.gm.get_submodule(node.target) if node.op == "call_module" else None
    handler = channel_handler(module) if module is not None else None
    single = len(args) == 1  # then src is the flattened tensor
    if (
        single
        and handler is not None
        and handler.maps_channels
        and getattr(module, "groups", 1) == 1
        and handler.axis % len(step.src_shape) == step.src[0]
    ):  # a classifier; a conv after a channel shuffle
        an.read_flattened(node.target, an.spread[spread_src])  # then read as usual
        return False
    if single and step.shape == step.src_shape and _keeps_every_entry(an, node):
        an.set_layout(node, step.src)
        an.set_spread(node, an.spread[spread_src])
        return True
    why = f"{node.name} reads channels flattened over {an.spread[spread_src]} entries each"
    for flat in [a for a in args if a in an.spread]:  # anything else sees an untracked, fixed axis
        an.unflatten(flat, why)
    step.src = an.lay(args[0])
    return False


def _keeps_every_entry(an: ChannelAnalysis, node: fx.Node) -> bool:
    """An op that maps each entry to itself: dropout, activations, casts (safe on flattened channels)."""
    if node.op == "call_module":
        module = an.gm.get_submodule(node.target)
        pointwise = (
            torch.nn.Dropout,
            torch.nn.Identity,
            torch.nn.ReLU,
            torch.nn.GELU,
            torch.nn.SiLU,
            torch.nn.Hardswish,
        )
        return isinstance(module, pointwise) and not any(True for _ in module.parameters())
    return _is_elementwise(node) or (node.op == "call_method" and node.target in _CAST_METHODS)
