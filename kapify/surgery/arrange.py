"""``kapify.arrange_channels``: lay a trained model's channels out so that similar filters are grid neighbours.

KAP averages each channel with its grid neighbours. In a trained model, neighbours by index learned
unrelated filters, so converting it averages them away. Permuting the channels of a coupled group
(every producer's outputs, every consumer's inputs, BatchNorm entries, ...; see
:func:`kapify.channel_groups`) changes nothing about the plain model's function, and can put
similar filters side by side first.

The placement (method ``"similarity"``): the cosine similarity of the channels' filters (all
producers' output filters, concatenated) defines a graph; its two leading non-trivial Laplacian
eigenvectors (a spectral embedding, as in spectral seriation, extended to two dimensions) give
each channel a point in the plane; a linear assignment (Hungarian) maps the points onto the
rows x cols grid cells one to one; then swaps of grid-adjacent channels that raise the neighbour
similarity polish the result. A 1-D layout sorts by the leading eigenvector. Cost: one C x C
eigendecomposition and assignment per group (ResNet50's largest group is 2048 channels).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..layers.grid import ChannelGrid, rect_grid
from .channels import ChannelGraph, ChannelGroup, analyze_channels
from .rewiden import apply_layout

__all__ = ["arrange_channels", "GroupArrangement", "grid_placement", "neighbour_similarity", "ARRANGE_METHODS"]

ARRANGE_METHODS = ("similarity",)


@dataclass
class GroupArrangement:
    """What :func:`arrange_channels` did to one channel group."""

    producers: List[str]
    width: int
    grid: str
    before: float  # mean cosine similarity of grid-neighbour filters, before
    after: float  # and after the permutation
    skipped: Optional[str] = None  # why the group was left as it was


def _pairs(grid: ChannelGrid) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cell indices of right and down neighbours on ``grid`` (row-major)."""
    cells = torch.arange(grid.channels).view(grid.rows, grid.cols)
    a = torch.cat([cells[:, :-1].flatten(), cells[:-1, :].flatten()])
    b = torch.cat([cells[:, 1:].flatten(), cells[1:, :].flatten()])
    return a, b


def neighbour_similarity(sim: torch.Tensor, position: torch.Tensor, grid: ChannelGrid) -> float:
    """Mean of ``sim[i, j]`` over channels i, j placed on grid-adjacent cells (``position[i]`` = cell of i)."""
    a, b = _pairs(grid)
    if a.numel() == 0:
        return float("nan")
    channel_at = torch.empty_like(position)
    channel_at[position] = torch.arange(len(position))
    return float(sim[channel_at[a], channel_at[b]].mean())


def grid_placement(sim: torch.Tensor, grid: ChannelGrid, polish_passes: int = 2) -> torch.Tensor:
    """A cell (row-major index) for each channel so that similar channels are grid neighbours.

    Example:
        >>> sim = torch.eye(4) + torch.diag(torch.ones(3), 1) + torch.diag(torch.ones(3), -1)  # a chain 0-1-2-3
        >>> order = [2, 0, 3, 1]
        >>> grid_placement(sim[order][:, order], ChannelGrid(1, 4)).tolist() in ([1, 3, 0, 2], [2, 0, 3, 1])
        True
    """
    from scipy.optimize import linear_sum_assignment

    c = sim.shape[0]
    affinity = sim.clamp_min(0).double()
    affinity.fill_diagonal_(0)
    degree = affinity.sum(1).clamp_min(1e-12)
    inv_sqrt = degree.rsqrt()
    laplacian = torch.eye(c, dtype=torch.float64) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    _, vectors = torch.linalg.eigh(laplacian)
    embedding = (vectors * inv_sqrt[:, None])[:, 1:3]  # skip the trivial eigenvector
    if grid.rows == 1 or grid.cols == 1 or c < 4:
        position = torch.empty(c, dtype=torch.long)
        position[torch.argsort(embedding[:, 0])] = torch.arange(c)
    else:
        ranks = torch.argsort(torch.argsort(embedding, dim=0), dim=0).double() / max(c - 1, 1)  # uniform in [0, 1]
        rows, cols = torch.meshgrid(torch.arange(grid.rows), torch.arange(grid.cols), indexing="ij")
        cells = torch.stack(
            [rows.flatten() / max(grid.rows - 1, 1), cols.flatten() / max(grid.cols - 1, 1)], 1
        ).double()
        cost = torch.cdist(ranks, cells).pow(2).numpy()
        _, cell = linear_sum_assignment(cost)
        position = torch.as_tensor(cell, dtype=torch.long)
    return _polish(sim.double(), position, grid, polish_passes)


def _polish(sim: torch.Tensor, position: torch.Tensor, grid: ChannelGrid, passes: int) -> torch.Tensor:
    """Swap channels on adjacent cells where that raises their summed similarity to their neighbours."""
    channel_at = np.empty(len(position), dtype=np.int64)
    channel_at[position.numpy()] = np.arange(len(position))
    s = sim.numpy()
    neighbours = [[] for _ in range(grid.channels)]
    a, b = _pairs(grid)
    for x, y in zip(a.tolist(), b.tolist()):
        neighbours[x].append(y)
        neighbours[y].append(x)

    def score(cell: int, channel: int, skip: int) -> float:
        return sum(s[channel, channel_at[n]] for n in neighbours[cell] if n != skip)

    for _ in range(passes):
        improved = False
        for x, y in zip(a.tolist(), b.tolist()):
            p, q = channel_at[x], channel_at[y]
            if score(x, q, y) + score(y, p, x) > score(x, p, y) + score(y, q, x) + 1e-12:
                channel_at[x], channel_at[y] = q, p
                improved = True
        if not improved:
            break
    position = torch.empty(len(channel_at), dtype=torch.long)
    position[torch.as_tensor(channel_at)] = torch.arange(len(channel_at))
    return position


def _filters(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Each channel's output filters over all producers, concatenated: (C, D)."""
    parts = []
    for name in group.producers:
        weight = model.get_submodule(name).weight.detach().double()
        if getattr(model.get_submodule(name), "transposed", False):
            weight = weight.transpose(0, 1)
        parts.append(torch.nn.functional.normalize(weight.flatten(1), dim=1))
    return torch.cat(parts, 1)


def arrange_channels(
    model: nn.Module,
    method: str = "similarity",
    example_input: Optional[torch.Tensor] = None,
    leaf_modules: Iterable[type] = (),
    grid: str = "rect",
) -> Tuple[nn.Module, List[GroupArrangement]]:
    """A copy of ``model`` whose free channel groups are permuted so that channels with similar
    filters are neighbours on the grid KAP will use (``grid``: "rect", the layout of
    :func:`kapify.convert` for the group's width, or "line"); the plain model computes exactly what
    it did. Returns the copy and, per group, the mean neighbour cosine similarity before and after.
    Groups that cannot be permuted (model input/output, grouped convs, fixed widths) stay as they are.

    Example:
        >>> import timm
        >>> arranged, report = arrange_channels(timm.create_model("resnet18"), example_input=torch.rand(1, 3, 64, 64))
        >>> all(r.after >= r.before for r in report if r.skipped is None)
        True
    """
    if method not in ARRANGE_METHODS:
        raise ValueError(f"unknown arrange method {method!r}; available: {list(ARRANGE_METHODS)}")
    if grid not in ("rect", "line"):
        raise ValueError(f"grid must be 'rect' or 'line' for arranging, got {grid!r}")
    new = copy.deepcopy(model)
    graph: ChannelGraph = analyze_channels(new, example_input, leaf_modules)
    widths = {g.id: g.width for g in graph.groups}
    index = {g.id: torch.arange(g.width) for g in graph.groups}
    report: List[GroupArrangement] = []
    for group in graph.groups:
        if not group.producers:
            continue
        layout = rect_grid(group.width) if grid == "rect" else ChannelGrid(1, group.width)
        split = any(len(graph.outputs[name]) > 1 for name in group.producers)
        reason = (
            group.fixed
            or ("grouped convs: channels cannot leave their group" if group.divisor > 1 else None)
            or ("a producer's output is split into segments: its grid spans several groups" if split else None)
            or (
                "the channel order matters to a member (GroupNorm groups, ECA's conv along channels)"
                if group.normalised
                else None
            )
        )
        identity = torch.arange(group.width)
        if split:
            report.append(GroupArrangement(list(group.producers), group.width, str(layout), 0.0, 0.0, reason))
            continue
        filters = _filters(new, group)
        sim = filters @ filters.T / len(group.producers)
        before = neighbour_similarity(sim, identity, layout)
        if reason is None and group.width > 2:
            index[group.id] = grid_placement(sim, layout)
        report.append(
            GroupArrangement(
                list(group.producers),
                group.width,
                str(layout),
                before,
                neighbour_similarity(sim, index[group.id], layout),
                reason,
            )
        )
    apply_layout(new, graph, widths, index)
    return new, report
