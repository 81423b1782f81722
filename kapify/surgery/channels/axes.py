"""Where an op puts the channel axis: pure functions of shapes and FX node arguments."""

from __future__ import annotations

import math
import operator
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import fx

REDUCTIONS = {
    "mean": torch.mean,
    "sum": torch.sum,
    "amax": torch.amax,
    "amin": torch.amin,
    "norm": torch.norm,
    "var": torch.var,
    "std": torch.std,
}


def shape_of(node: Any) -> Optional[torch.Size]:
    """The traced shape of a node's tensor (None: not a tensor, or not traced)."""
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def name_of(target: Any) -> str:
    """A call target's name: the method name, or the function's ``__name__``."""
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def follow_axis(before: Sequence[int], after: Sequence[int], axis: int) -> Optional[int]:
    """Where a reshape (view, flatten, ...) puts dim ``axis``: the output dim of the same size with
    as many elements before it (exact for row-major reshapes), else None."""
    outer = math.prod(before[:axis])
    for d, size in enumerate(after):
        if size == before[axis] and math.prod(after[:d]) == outer:
            return d
    return None


def split_axis(before: Sequence[int], after: Sequence[int], axis: int) -> Optional[Tuple[int, int, int]]:
    """(first, last, pieces) when a reshape splits dim ``axis`` into the consecutive output dims
    first..last (pieces = its size // after[last]): SKNet's ``view(B, paths, C // paths, H, W)``,
    attention's ``reshape(B, N, 3, heads, head_dim)``; else None."""
    outer, channels = math.prod(before[:axis]), before[axis]
    for d in range(len(after)):
        if math.prod(after[:d]) != outer:
            continue
        for end in range(d + 2, len(after) + 1):
            if math.prod(after[d:end]) == channels and after[end - 1] < channels:
                return d, end - 1, channels // after[end - 1]
    return None


def merged_axis(before: Sequence[int], after: Sequence[int], axis: int) -> Optional[Tuple[int, int]]:
    """(output dim, copies) when a reshape merges dim ``axis`` with dims before it, the channels
    innermost (attention heads back together: (N, h, d) -> (N, h*d) with the channels on d), else None."""
    for first in range(axis - 1, -1, -1):
        outer, merged = math.prod(before[:first]), math.prod(before[first : axis + 1])
        for d, size in enumerate(after):
            if size == merged > before[axis] and math.prod(after[:d]) == outer:
                return d, merged // before[axis]
    return None


def flattened_axis(before: Sequence[int], after: Sequence[int], axis: int) -> Optional[Tuple[int, int]]:
    """(output dim, entries per channel) when a reshape merges dim ``axis`` with the dims after it
    (channels outermost, as ``torch.flatten(x, 1)`` before a classifier), else None."""
    outer, size = math.prod(before[:axis]), before[axis]
    for d, merged in enumerate(after):
        if math.prod(after[:d]) == outer:
            for end in range(axis + 2, len(before) + 1):
                if math.prod(before[axis:end]) == merged and merged > size:
                    return d, merged // size
    return None


def indexed_axis(index: Any, ndim: int, axis: int) -> Optional[int]:
    """Where ``x[index]`` puts dim ``axis`` of ``x``: None if it indexes or slices the channels, or
    uses anything but ints, full-or-partial slices of other dims, None and one Ellipsis."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(i is Ellipsis for i in items) > 1 or not all(
        i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items
    ):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(i is not None for i in items) - 1
        items[at : at + 1] = [slice(None)] * (ndim - used)
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


def pads_only_other_dims(node: fx.Node, ndim: int, axis: int) -> bool:
    """Whether ``F.pad(x, pad)`` leaves dim ``axis`` alone: its pair (counted from the last dim) is
    absent or literally (0, 0); the other pairs may be computed at run time."""
    pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(pad, (list, tuple)):
        return False
    at = 2 * (ndim - 1 - axis)
    return at >= len(pad) or (pad[at] == 0 and pad[at + 1] == 0 and not isinstance(pad[at], fx.Node))


def permutation(node: fx.Node, ndim: int) -> Optional[List[int]]:
    """The dim order of a permute / transpose node."""
    args = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k in ("dims", "dim0", "dim1", "axis0", "axis1")]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    if not all(isinstance(a, int) for a in args):
        return None
    if name_of(node.target) in ("transpose", "swapaxes"):
        order = list(range(ndim))
        a, b = (d % ndim for d in args)
        order[a], order[b] = order[b], order[a]
        return order
    return [d % ndim for d in args]


def permuted_axis(axis: int, dims: Sequence[int], ndim: int) -> int:
    return [d % ndim for d in dims].index(axis)


def reduced_dims(node: fx.Node, ndim: int) -> Optional[Tuple[set, bool]]:
    """(the dims a mean/sum/amax/amin/norm/var/std reduces, keepdim), None if not known from the graph."""
    first = 2 if name_of(node.target) == "norm" else 1  # norm(input, p, dim, keepdim)
    if name_of(node.target) in ("var", "std") and len(node.args) > first + 1:  # var(input, dim, unbiased, keepdim)
        return None
    dim = node.kwargs.get("dim", node.args[first] if len(node.args) > first else None)
    keepdim = node.kwargs.get("keepdim", node.args[first + 1] if len(node.args) > first + 1 else False)
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if dim is None or not isinstance(keepdim, bool) or not all(isinstance(d, int) for d in dims):
        return None
    return {d % ndim for d in dims}, keepdim


def reshape_sizes(node: fx.Node) -> List[Any]:
    """The sizes a view/reshape node asks for (ints, or nodes computed at run time)."""
    sizes = list(node.args[2:] if node.op == "call_function" else node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    return sizes or list(node.kwargs.get("shape", node.kwargs.get("size", ())))


def stored_width(node: fx.Node, axis: int, least: int = 2) -> bool:
    """Whether a view/reshape writes the channel count at ``axis`` as a literal of at least ``least``
    (from a stored attribute, not -1 or a size read off the tensor): widening would break it at run time."""
    if name_of(node.target) not in ("view", "reshape"):
        return False
    sizes = reshape_sizes(node)
    return axis < len(sizes) and isinstance(sizes[axis], int) and sizes[axis] >= least


def size_read(value: Any) -> Optional[Tuple[fx.Node, int, int, int]]:
    """(tensor, dim, num, den) when ``value`` is ``tensor.shape[dim] * num // den`` computed at run time
    (``C`` of ``B, N, C = x.shape``, ``x.size(1)``, ``C // self.num_heads``), else None."""
    if not isinstance(value, fx.Node) or value.op not in ("call_function", "call_method"):
        return None
    args = value.args
    if value.target in (operator.floordiv, operator.mul) and len(args) == 2:
        node, k = (args[1], args[0]) if isinstance(args[0], int) else args
        read = (
            size_read(node)
            if isinstance(k, int) and k > 0 and not (value.target is operator.floordiv and node is args[1])
            else None
        )
        if read is None:
            return None
        tensor, dim, num, den = read
        return (tensor, dim, num, den * k) if value.target is operator.floordiv else (tensor, dim, num * k, den)
    if value.target == "size" and len(args) == 2 and isinstance(args[1], int):
        return args[0], args[1], 1, 1
    if value.target is operator.getitem and isinstance(args[1], int) and isinstance(args[0], fx.Node):
        base = args[0]
        whole = (base.op == "call_function" and base.target is getattr and base.args[1] == "shape") or (
            base.op == "call_method" and base.target == "size" and len(base.args) == 1
        )
        return (base.args[0], args[1], 1, 1) if whole else None
    return None


def cat_dim(node: fx.Node) -> int:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    shape = shape_of(node)
    return dim + len(shape) if isinstance(dim, int) and dim < 0 and shape is not None else dim
