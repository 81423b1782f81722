"""TorchScript for converted models: what ``torch.jit.script`` compiles in place of a Kap conv.

A Kap conv is its original conv re-classed with a mixin whose ``forward`` takes ``*args`` and calls
``super()``; TorchScript compiles neither. ``torch.jit.script`` first asks every module for
``__prepare_scriptable__()``: a Kap conv answers with a :class:`ScriptableKapConv`, a plain module
that runs the same computation in TorchScript's subset (the input stages the conv hosts, the
original conv, the channel pool on its output through ``channel_pool``'s own ``pool_grid``, the
blend, the noise). Outputs equal the eager
model's (the pool always runs on the output there: the weight route gives the same numbers).
The scripted model's ``state_dict`` keys gain a ``.conv`` level inside each converted conv.
``torch.jit.script`` puts the twins into the module it is given (it does so for any module with
``__prepare_scriptable__``): script ``copy.deepcopy(model)`` to keep the eager model as it is.

Example:
    >>> import timm, torch, kapify
    >>> kap = kapify.convert(timm.create_model("resnet18", num_classes=10), grid="rect").eval()
    >>> scripted = torch.jit.script(kap)
    >>> x = torch.rand(1, 3, 32, 32)
    >>> torch.allclose(scripted(x), kap(x), atol=1e-5)
    True
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..layers import KernelAvgPool
from ..layers.channel_pool import pool_grid, pool_window
from ..layers.grid import ChannelGrid

__all__ = ["ScriptableKapConv"]


class ScriptableKapConv(nn.Module):
    """The TorchScript twin of a Kap conv (see the module docstring); built by ``conv.__prepare_scriptable__()``."""

    def __init__(
        self, conv: nn.Module, pool: nn.Module | None, noise: nn.Module | None, blend: float, stages: List[nn.Module]
    ) -> None:
        super().__init__()
        self.stages = (
            nn.Sequential(*stages) if stages else nn.Identity()
        )  # no loop here: TorchScript types it per instance
        self.conv = conv
        self.noise = noise if noise is not None else nn.Identity()
        self.pooled = pool is not None
        self.average = isinstance(pool, KernelAvgPool)
        self.blend = float(blend)
        k, s = (pool.kernel_size, pool.stride) if pool is not None else (1, 1)
        grid = pool.grid if pool is not None and pool.grid is not None else ChannelGrid(1, conv.out_channels)
        self.rows, self.cols = grid.rows, grid.cols
        self.sheet_channels = grid.pooled(s).channels
        # what the twin passes on (spare filters: fewer than the sheet); like the conv's, for blocks that read them
        self.in_channels = conv.in_channels
        self.out_channels = pool.out_channels(conv.out_channels) if pool is not None else conv.out_channels
        self.kernel, self.step, self.pad = pool_window(grid, k, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.stages(x))
        if self.pooled:
            pooled = pool_grid(
                y, self.rows, self.cols, self.sheet_channels, self.kernel, self.step, self.pad, self.average
            )
            pooled = pooled[:, : self.out_channels]
            y = pooled if self.blend == 1.0 else torch.lerp(y[:, : self.out_channels], pooled, self.blend)
        return self.noise(y)
