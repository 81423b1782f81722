"""Grouped convs that change their number of groups when re-widened.

A grouped conv with a depth multiplier (``out = m x in``, MaxViT's and PiT's stride-2 depthwise convs,
SENet154's 64 groups of 2 -> 4 channels) that only gains whole groups keeps ``out = m x in``: for m = 2
never two squares. Merging its groups frees the output width: ``g`` groups of ``a / g`` inputs each hold
several old groups (their inputs and outputs side by side, zero weights between them), so any output width
``b >= m x a`` with ``g`` dividing both works. :func:`merged_square` picks ``b``, :func:`merged_index` places
the old outputs, and :func:`regroup` is how :func:`~kapify.surgery.handlers.resize_layer` reads any layout back.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

__all__ = ["MAX_MERGED", "merged_index", "merged_square", "regroup"]

#: a merged group reads at most this many times the inputs of one original group (its conv's FLOPs grow as much)
MAX_MERGED = 4


def merged_square(channels_in: int, per_in: int, per_out: int) -> Optional[Tuple[int, int]]:
    """(output width, groups) for a grouped conv of ``per_in`` -> ``per_out`` channels per group that reads
    ``channels_in``: the least square ``b >= channels_in / per_in * per_out`` (and within 2x of it) whose
    ``g = gcd(channels_in / per_in, b)`` merged groups each hold at most :data:`MAX_MERGED` old ones; None if none.

    Example:
        >>> merged_square(64, 1, 2), merged_square(144, 2, 4)  # 16 groups of 4 -> 9; 36 groups of 4 -> 9
        ((144, 16), (324, 36))
    """
    least = channels_in // per_in * per_out
    n = math.isqrt(least - 1) + 1
    while n * n <= 2 * least:
        groups = math.gcd(channels_in // per_in, n * n)
        if channels_in // groups <= MAX_MERGED * per_in:
            return n * n, groups
        n += 1
    return None


def merged_index(in_index: torch.Tensor, per_in: int, per_out: int, new_per_in: int, new_per_out: int) -> torch.Tensor:
    """Where the old outputs of a conv with merged groups go: old group i's ``per_out`` outputs side by side in
    the new group that holds its inputs (``in_index``: their new positions), after those of earlier old groups there."""
    group_of = in_index[::per_in] // new_per_in
    taken: Dict[int, int] = {}
    rank = []  # how many old groups the new one holds already
    for g in group_of.tolist():
        rank.append(taken.get(g, 0))
        taken[g] = rank[-1] + 1
    start = group_of * new_per_out + torch.tensor(rank) * per_out
    return (start[:, None] + torch.arange(per_out)).flatten()


def regroup(in_index: torch.Tensor, out_index: torch.Tensor, groups: int, new_in: int, new_out: int) -> Optional[int]:
    """How many groups a grouped conv with ``groups`` groups has once its old input and output channels move to
    ``in_index`` / ``out_index`` of ``new_in`` / ``new_out``: ``groups`` when old group i is still group i (each
    group wider, or nothing moved), else the most groups that keep each old group's inputs and outputs together
    (whole new groups; merged groups); None if that splits an old group or makes groups over :data:`MAX_MERGED`
    times as wide.

    Example:
        >>> regroup(torch.arange(4), torch.arange(8), groups=4, new_in=6, new_out=12)  # two more groups of 1 -> 2
        6
    """
    per_in, per_out = len(in_index) // groups, len(out_index) // groups

    def holding(g: int) -> Optional[torch.Tensor]:  # the new group of each old one, if its channels stay together
        ins = (in_index // (new_in // g)).view(groups, per_in)
        outs = (out_index // (new_out // g)).view(groups, per_out)
        return ins[:, 0] if (ins == ins[:, :1]).all() and (outs == ins[:, :1]).all() else None

    common = math.gcd(new_in, new_out)
    if common % groups == 0:
        kept = holding(groups)
        if kept is not None and torch.equal(kept, torch.arange(groups)):
            return groups
    return next(
        (
            d
            for d in range(common, 0, -1)
            if common % d == 0 and new_in // d <= MAX_MERGED * per_in and holding(d) is not None
        ),
        None,
    )
