"""Rules for layers (call_module nodes): what a layer does to the channels it reads.

The layer's :class:`~kapify.surgery.handlers.ChannelHandler` (the registry users extend with
:func:`kapify.register_channel_handler`) lays out its channels: a conv/linear reads its input
channels and produces a new group; a channelwise layer (BatchNorm) and a depthwise conv carry their
input's groups; a GroupNorm/LayerNorm also marks them normalised; self-attention
(``nn.MultiheadAttention``) carries them in whole heads. This module checks what holds for every
layer (which dim it reads, other tensor inputs) first. A stateless layer without a handler
(``nn.Flatten``, an activation) is followed like a reshape; any other one fixes the channels,
unless a rule is registered for its type (:func:`register_layer_rule`: a block FX keeps whole).
"""

from __future__ import annotations

import itertools
from typing import Callable, List, Optional, Sequence, Type

from torch import nn

from ..handlers import channel_handler
from ..optional import optional_imports
from ..registry import Registry
from .axes import follow_axis, permuted_axis
from .context import ChannelAnalysis, Located, Step
from .graph import Layout, SliceSite
from .layer_layouts import layout_rule, weight_layout

__all__ = [
    "LayerRule",
    "add_to_stream",
    "attention_leaf",
    "module_layout",
    "register_layer_rule",
    "layers_in_sequence",
    "split_in_leaf",
]

# torchvision's ConvNeXt moves channels last with a Permute module
_PERMUTES = optional_imports("torchvision.ops.misc:Permute", used_for="layer layout: torchvision's Permute (ConvNeXt)")


LayerRule = Callable[[ChannelAnalysis, Step, nn.Module], Optional[Located]]
#: blocks FX keeps whole -> the rule that lays out their output (subclasses included)
LAYER_RULES: Registry[LayerRule] = Registry("layer rule")


def register_layer_rule(*layer_types: Type[nn.Module], reason: str = "") -> Callable[[LayerRule], LayerRule]:
    """Register ``rule(analysis, step, layer)`` for a block FX keeps whole (a leaf, e.g. one with
    data-dependent control flow): the layout of its output, given the layers it calls."""
    bad = [t for t in layer_types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad or not layer_types:
        raise TypeError(
            f"register_layer_rule takes nn.Module classes, got {bad or 'none'}; e.g. @register_layer_rule(MyBlock)"
        )

    def register(rule: LayerRule) -> LayerRule:
        for layer_type in layer_types:
            LAYER_RULES.add(layer_type, rule, reason)
        return rule

    return register


def _inner_layer(an: ChannelAnalysis, step: Step, name: str, src: Located) -> Optional[Located]:
    """The layout after layer ``name`` (a conv/linear, a norm, or a stateless one) of the leaf block ``step`` calls,
    reading ``src``; None for a layer with weights but no channel handler (its input stays as it is)."""
    path = f"{step.node.target}.{name}"
    layer = an.gm.get_submodule(path)
    handler = channel_handler(layer)
    if handler is None:
        if any(t.dim() > 0 for t in list(layer.parameters()) + list(layer.buffers())):
            an.fix_all([src], f"{type(layer).__name__} '{path}' has no channel handler")
            return None
        return src
    return layout_rule(handler).inner(an, step, path, layer, handler, src)


def layers_in_sequence(
    an: ChannelAnalysis, step: Step, names: Sequence[str], src: Optional[Located] = None
) -> Optional[Located]:
    """A leaf block that calls its layers ``names`` (convs, linears, norms) one after the other on its input (or
    ``src``)."""
    located = step.src if src is None else src
    for name in names:
        located = _inner_layer(an, step, name, located) if located is not None else None
    return located


def split_in_leaf(an: ChannelAnalysis, step: Step, located: Located, sizes: Sequence[int], owner: str) -> List[Layout]:
    """A leaf block's ``x.split(sizes)`` of ``located`` at sizes its block ``owner`` (a path under the leaf) stores:
    the pieces' layouts; the site is recorded, so the owner's block handler rewrites the sizes."""
    pieces = an.cut_layout(located[1], sizes)
    ends = list(itertools.accumulate(sizes))[:-1]
    an.add_slice(
        SliceSite(f"{step.node.target}.{owner}", [(end, sum(pieces[: i + 1], ())) for i, end in enumerate(ends)])
    )
    return pieces


def add_to_stream(an: ChannelAnalysis, stream: Located, *branches: Optional[Located]) -> Located:
    """Branches of a leaf block that add their output to ``stream`` (residuals; a depthwise branch is the stream
    already): their layouts merge with it; a branch not followed (None) is skipped. Returns ``stream``."""
    for branch in branches:
        if branch is not None:
            an.groups.union_layouts(an.groups.align([branch[1], stream[1]]))
    return stream


def attention_leaf(
    an: ChannelAnalysis, step: Step, heads: int, readers: Sequence[str], proj: str, per_head: Sequence[str] = ()
) -> Optional[Located]:
    """A leaf self-attention block: layers ``readers`` read its input into q, k, v pieces of the input's
    width in ``heads`` heads (``C // self.num_heads`` per head), layer ``proj`` writes its output, and
    ``per_head`` layers or parameters have one output entry per head; widening adds heads (the block's
    handler rewrites their count)."""
    node, src, block = step.node, step.src, an.gm.get_submodule(step.node.target)
    total = an.groups.total(src[1]) if src is not None else 0
    if src is None or len(src[1]) != 1 or src[0] != len(step.src_shape) - 1 or total % heads:
        an.fix_all([src], f"{type(block).__name__} '{node.target}' reads channels it cannot split into {heads} heads")
        return an.fresh(node, f"output of '{node.target}'")
    head = an.groups.new(heads)
    an.groups.multiply(src[1][0], head, total // heads, 1)
    an.stored(step, heads, (head,))
    for name in readers:
        pieces = _inner_layer(an, step, name, src)[1]
        an.groups.union_layouts(an.groups.align([pieces, src[1] * (an.groups.total(pieces) // total)]))  # q, k, v
    for name in per_head:
        path, value = f"{node.target}.{name}", getattr(block, name)
        if isinstance(value, nn.Parameter):  # one entry per head on dim 0 (ConViT's gating)
            an.add_parameter(path, 0, head)
            continue
        handler = channel_handler(value)  # a layer whose outputs are the heads (ConViT's positional scores)
        inputs = (src[0], (an.groups.new(handler.count(value, handler.in_attr), f"input of '{path}'"),))
        heads = weight_layout(an, step, path, value, handler, inputs)[1]
        an.groups.union_layouts(an.groups.align([heads, (head,)]))
    return _inner_layer(an, step, proj, src)


def module_layout(an: ChannelAnalysis, step: Step, module: nn.Module) -> Optional[Located]:
    """The layout of a layer's output, recording the layer's role in the groups it touches."""
    rule = LAYER_RULES.for_class(type(module))
    if rule is not None and step.src is not None:
        return rule(an, step, module)
    handler = channel_handler(module)
    if handler is None:
        return _without_handler(an, step, module)
    node, src, what = step.node, step.src, f"{type(module).__name__} '{step.node.target}'"
    if src is None:
        located = an.set_layout(node, an.fresh(node, f"input of '{node.target}' has no traced channel layout"))
        an.pinned(node, module, handler)
        return located
    axis = handler.axis % len(step.src_shape)
    if not handler.reads_other_inputs:  # more tensor inputs (CondConv's routing weights): what it does is unknown
        an.fix_all([an.lay(a) for a in step.args[1:]], f"{what} reads it besides its input")
    multi = [
        a
        for a in (handler.in_attr, handler.out_attr)
        if isinstance(getattr(module, a), (tuple, list)) and len(getattr(module, a)) != 1
    ]
    if multi:  # e.g. LayerNorm over (C, H, W): not one channel dim
        an.fix_all([src], f"{what} has a multi-dim {multi[0]}")
        return an.fresh(node, f"output of {what}")
    guessed = all(an.groups.is_fixed(g) for g in src[1])  # e.g. XCiT's Fourier features: no traced channels
    if layout_rule(handler).slides_along(an, step, src, guessed):
        return src
    if src[0] != axis and guessed:  # the traced axis was only a guess
        src = (
            axis,
            (an.groups.new(int(step.src_shape[axis]), f"input of '{node.target}' has no traced channel layout"),),
        )
    declared = getattr(module, handler.in_attr, None)
    declared = declared[0] if isinstance(declared, (tuple, list)) and len(declared) == 1 else declared
    if isinstance(declared, int) and not guessed and step.src_shape[axis] != declared:
        # e.g. a LayerNorm subclass whose own forward permutes NCHW to channels-last: not what its class does
        an.fix_all([an.lay(a) for a in step.args], f"{what} reads dim {axis} of {step.src_shape[axis]} entries, "
                   f"but its {handler.in_attr} is {declared}: its forward is not its base class's")  # fmt: skip
        located = an.set_layout(node, an.fresh(node, f"output of {what}, whose forward kapify cannot see into"))
        an.pinned(node, module, handler)
        return located
    if (
        src[0] != axis
        and handler.passes_other_dims
        and step.shape is not None
        and len(step.shape) == len(step.src_shape)
        and step.shape[src[0]] == step.src_shape[src[0]]
    ):
        return src  # MLP-Mixer's token mixing, a norm over the head dim: the channels stay on their dim
    if src[0] != axis:  # e.g. a conv reading a dim other than the channels
        an.fix_all([src], f"{what} reads dim {axis}, the channels are on dim {src[0]}")
        located = an.set_layout(node, an.fresh(node, f"output of {what}, which reads dim {axis}"))
        an.pinned(node, module, handler)
        return located
    return layout_rule(handler).layout(an, step, node.target, module, handler, src)


def _without_handler(an: ChannelAnalysis, step: Step, module: nn.Module) -> Optional[Located]:
    """Permute modules move the channels; stateless layers are followed like a reshape; others fix them."""
    node, src = step.node, step.src
    has_state = any(t.dim() > 0 for t in list(module.parameters(recurse=True)) + list(module.buffers(recurse=True)))
    if isinstance(module, _PERMUTES) and src is not None:
        return an.moved(node, src, permuted_axis(src[0], module.dims, len(step.src_shape)), node.name)
    if not has_state and src is not None and step.shape is not None and step.src_shape is not None:
        return an.moved(node, src, follow_axis(step.src_shape, step.shape, src[0]), node.name)
    an.fix_all([an.lay(a) for a in step.args], f"{type(module).__name__} '{node.target}' has no channel handler")
    return an.fresh(node, f"output of {type(module).__name__} '{node.target}'")
