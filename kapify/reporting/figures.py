"""Figures shared by the reports: first-layer kernels laid out on the KAP grid (the paper's Fig. 7)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import torch

__all__ = ["plot_kernel_mosaics"]


def plot_kernel_mosaics(
    panels: List[Tuple[str, torch.Tensor]], path: Path, title: str = "First-layer kernels on the channel grid"
) -> None:
    """One panel per ``(caption, mosaic)``, mosaics from :func:`kapify.evaluation.topography.kernel_mosaic`
    ((H, W, 3) in [0, 1], kernels separated by white lines), drawn with nearest-neighbour pixels at
    about 12 screen pixels per kernel pixel so that a 3x3 kernel and its neighbours can be told apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(max(m.shape[0], m.shape[1]) for _, m in panels)
    inches = min(max(side * 12 / 100, 4.0), 9.0)  # ~12 px per mosaic pixel at dpi 100, within reason
    fig, axes = plt.subplots(1, len(panels), figsize=(inches * len(panels), inches + 0.7), squeeze=False)
    for ax, (caption, mosaic) in zip(axes[0], panels):
        ax.imshow(mosaic.numpy(), interpolation="nearest")
        ax.set_title(caption, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
