"""Model diagnostics for the paper's figures: first-layer kernels on the KAP grid with a numeric
topography score (Fig. 7), and the per-layer change of activations under attack (Fig. A4)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.grid import ChannelGrid, rect_grid
from ..surgery.config import get_config
from ..surgery.conv_types import is_conv

__all__ = ["first_conv", "topography_score", "kernel_mosaic", "activation_change"]


def first_conv(model: nn.Module) -> tuple[str, nn.Module, ChannelGrid]:
    """The first convolution and the grid its output channels are pooled on."""
    config = get_config(model)
    if config is not None and config.layers:
        record = config.layers[0]
        conv = model.get_submodule(record.name)
        grid = ChannelGrid.parse(record.grid) if record.grid else rect_grid(conv.out_channels)
        return record.name, conv, grid
    name, conv = next((n, m) for n, m in model.named_modules() if is_conv(m))
    return name, conv, rect_grid(conv.out_channels)


def topography_score(weight: torch.Tensor, grid: ChannelGrid) -> Dict[str, float]:
    """Mean cosine similarity of kernels that are grid neighbours (right and below) vs of all pairs.

    A topographically organised layer (paper §3.3) has ``neighbour >> all_pairs``; ``score`` is
    their difference (about 0 for an unorganised layer).

    Example:
        >>> w = torch.arange(16.).view(4, 1, 2, 2).repeat_interleave(4, 0)  # 4 blocks of 4 equal kernels
        >>> topography_score(w, ChannelGrid(1, 16))["neighbour"] > topography_score(w, ChannelGrid(1, 16))["all_pairs"]
        True
    """
    flat = F.normalize(weight.detach().float().flatten(1), dim=1)
    sim = flat @ flat.T
    idx = torch.arange(grid.channels).view(grid.rows, grid.cols)
    pairs = [(idx[:, :-1], idx[:, 1:]), (idx[:-1, :], idx[1:, :])]
    neighbour = torch.cat([sim[a.flatten(), b.flatten()] for a, b in pairs if a.numel()])
    off_diag = sim[~torch.eye(grid.channels, dtype=torch.bool)]
    n_mean, all_mean = neighbour.mean().item(), off_diag.mean().item()
    return {"neighbour": n_mean, "all_pairs": all_mean, "score": n_mean - all_mean}


def kernel_mosaic(weight: torch.Tensor, grid: ChannelGrid, pad: int = 1) -> torch.Tensor:
    """First-layer RGB kernels laid out on the channel grid as one (H, W, 3) image in [0, 1]."""
    w = weight.detach().float()[:, :3]
    low = w.flatten(1).min(1).values.view(-1, 1, 1, 1)
    high = w.flatten(1).max(1).values.view(-1, 1, 1, 1)
    w = (w - low) / (high - low).clamp_min(1e-12)
    k_h, k_w = w.shape[-2:]
    canvas = torch.ones(3, grid.rows * (k_h + pad) + pad, grid.cols * (k_w + pad) + pad)
    for c in range(grid.channels):
        r, q = divmod(c, grid.cols)
        canvas[
            :, pad + r * (k_h + pad) : pad + r * (k_h + pad) + k_h, pad + q * (k_w + pad) : pad + q * (k_w + pad) + k_w
        ] = w[c]
    return canvas.permute(1, 2, 0)


@torch.no_grad()
def activation_change(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, names: Optional[List[str]] = None
) -> Dict[str, float]:
    """Per conv layer: mean over examples of ``||f(x_adv) - f(x)|| / ||f(x)||`` (paper Fig. A4),
    measured on each conv module's output (after its KAP in a converted model)."""
    names = names or [n for n, m in model.named_modules() if is_conv(m)]
    outputs: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: outputs[n].append(o.detach().flatten(1).float())
        )
        for n in names
    ]
    try:
        model(x)
        model(x_adv)
    finally:
        for h in handles:
            h.remove()
    change = {}
    for n, (clean, adv) in outputs.items():
        change[n] = ((adv - clean).norm(dim=1) / clean.norm(dim=1).clamp_min(1e-12)).mean().item()
    return change
