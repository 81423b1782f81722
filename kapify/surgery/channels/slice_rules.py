"""Rules for ops that cut the channel axis: ``split``, ``chunk``, ``narrow``, ``x[:, a:b]`` (and ``unbind``).

A cut refines the groups it crosses into segments (everything carrying those channels is cut too),
so each piece can widen on its own. ``chunk(n)`` needs no stored size (its pieces keep one width);
a cut at literal sizes is followed only inside a block with a block handler
(:func:`kapify.register_block_handler`), which rewrites the sizes after re-widening.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, Sequence

import torch

from .axes import indexed_axis, name_of
from .context import ChannelAnalysis, Step
from .node_rules import register_node_rule

__all__: list = []  # rules only: they register themselves


def _literal(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_node_rule(torch.split, torch.chunk, methods=("split", "chunk"))
def split(an: ChannelAnalysis, step: Step) -> Any:
    """split/chunk: along the channels, pieces are segments (stored sizes need a block handler); along other dims,
    each piece keeps them"""
    node, src = step.node, step.src
    metas = node.meta.get("tensor_meta")
    if src is None or not isinstance(metas, (tuple, list)) or not all(hasattr(m, "shape") for m in metas):
        return NotImplemented
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    if not _literal(dim):
        return NotImplemented
    ndim = len(step.src_shape)
    if dim % ndim != src[0]:
        an.set_pieces(node, [src] * len(metas))
        return None
    sizes = [int(m.shape[src[0]]) for m in metas]
    how = node.kwargs.get(
        "split_size_or_sections", node.kwargs.get("split_size", node.args[1] if len(node.args) > 1 else None)
    )
    if name_of(node.target) == "chunk":
        pieces = an.cut(step, sizes, "equal", ()) if len(set(sizes)) == 1 else None
    elif _literal(how):
        pieces = an.cut(step, sizes, "leading", [how])
    elif isinstance(how, (list, tuple)) and all(_literal(s) for s in how):
        pieces = an.cut(step, sizes, "offsets", list(itertools.accumulate(how)))
    else:
        return NotImplemented
    if pieces is None:
        return NotImplemented
    an.set_pieces(node, pieces)
    return None


@register_node_rule(torch.unbind, methods=("unbind",))
def unbind(an: ChannelAnalysis, step: Step) -> Any:
    """unbind along another dim (attention's ``q, k, v = qkv.unbind(0)``): each piece keeps the channels"""
    node, src = step.node, step.src
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if src is None or step.src_shape is None or not _literal(dim) or dim % len(step.src_shape) == src[0]:
        return NotImplemented
    an.set_pieces(node, [(src[0] - (dim % len(step.src_shape) < src[0]), src[1])] * int(step.src_shape[dim]))
    return None


@register_node_rule(torch.narrow, methods=("narrow",))
def narrow(an: ChannelAnalysis, step: Step) -> Any:
    """narrow(dim, start, length): along the channels a slice at stored offsets; along other dims the channels stay"""
    node, src = step.node, step.src
    args = list(node.args[1:]) + [node.kwargs[k] for k in ("dim", "start", "length") if k in node.kwargs]
    if src is None or len(args) != 3 or not all(_literal(a) for a in args):
        return NotImplemented
    dim, start, length = args
    if dim % len(step.src_shape) != src[0]:
        return src
    return _channel_range(an, step, src[0], start, start + length, [start, start + length])


@register_node_rule(operator.getitem, getattr)
def getitem(an: ChannelAnalysis, step: Step) -> Any:
    """x[...]: a piece of a split; x[:, a:b] a slice of the channels; x[:, 0] (a ViT's cls token) keeps them;
    non-tensors have none"""
    node, src = step.node, step.src
    if step.shape is None:
        return None
    if node.target is not operator.getitem:
        return NotImplemented
    if node.args[0] in an.pieces:
        pieces, index = an.pieces[node.args[0]], node.args[1]
        return pieces[index] if isinstance(index, int) and -len(pieces) <= index < len(pieces) else NotImplemented
    if src is None or step.src_shape is None:
        return NotImplemented
    items = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
    cut = items[src[0]] if Ellipsis not in items and None not in items and len(items) > src[0] else slice(None)
    if not isinstance(cut, slice) or cut == slice(None):
        axis = indexed_axis(node.args[1], len(step.src_shape), src[0])
        if axis is None and isinstance(cut, slice) and all(i == slice(None) for i in items[src[0] + 1 :]):
            axis = len(step.shape) - (len(step.src_shape) - src[0])  # x[index_tensor]: trailing dims stay trailing
            axis = axis if 0 <= axis < len(step.shape) and step.shape[axis] == step.src_shape[src[0]] else None
        return an.moved(node, src, axis, node.name)
    if cut.step not in (None, 1) or not all(v is None or (_literal(v) and v >= 0) for v in (cut.start, cut.stop)):
        return NotImplemented
    axis = indexed_axis(tuple(items[: src[0]] + [slice(None)] + items[src[0] + 1 :]), len(step.src_shape), src[0])
    total = an.groups.total(src[1])
    stop = total if cut.stop is None else min(cut.stop, total)
    return (
        NotImplemented if axis is None else _channel_range(an, step, axis, cut.start or 0, stop, [cut.start, cut.stop])
    )


def _channel_range(an: ChannelAnalysis, step: Step, axis: int, start: int, stop: int, stored: Sequence[Any]) -> Any:
    """The layout of channels start..stop of ``step.src`` (a slice at offsets a block stores)."""
    total = an.groups.total(step.src[1])
    if not 0 <= start < stop <= total:
        return NotImplemented
    sizes = [s for s in (start, stop - start, total - stop) if s > 0]
    pieces = an.cut(step, sizes, "offsets", [at for at in stored if _literal(at) and at > 0])
    return NotImplemented if pieces is None else (axis, pieces[1 if start > 0 else 0][1])
