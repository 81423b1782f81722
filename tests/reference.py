"""Slow, obviously-correct references the fast ops are tested against."""

from __future__ import annotations

import math

import torch


def channel_pool_loops(x: torch.Tensor, k: int, stride: int, grid, mode: str) -> torch.Tensor:
    """Channel pooling by explicit loops over output grid positions (Eq. 2 / Eq. 10 of the paper)."""
    n, c = x.shape[:2]
    rows, cols = grid if grid is not None else (1, c)
    line = grid is None
    half = k // 2
    out_rows = rows if line else math.ceil(rows / stride)
    out_cols = math.ceil(cols / stride)
    outs = []
    for i in range(out_rows):
        for j in range(out_cols):
            ci = i if line else stride * i
            cj = stride * j
            row_range = [ci] if line else range(ci - half, ci + half + 1)
            members = [
                r * cols + q
                for r in row_range
                for q in range(cj - half, cj + half + 1)
                if 0 <= r < rows and 0 <= q < cols
            ]
            window = x[:, members]
            outs.append(window.mean(dim=1) if mode == "avg" else window.amax(dim=1))
    return torch.stack(outs, dim=1)
