"""The small convnets of the paper's §4.2 studies: 1-3 blocks of conv -> BatchNorm -> ReLU."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["SmallConvNet", "small_convnet"]


class SmallConvNet(nn.Module):
    """``depth`` blocks of conv(k x k) -> BatchNorm -> ReLU (-> 2x2 max-pool), then global average
    pooling and a linear classifier. ``width`` is one int for every block or one per block.

    With ``downsample`` the ReLU runs after the max-pool: max and ReLU commute (both monotone), so the
    block computes the same function and gradients as conv -> BN -> ReLU -> max-pool, with the ReLU
    on a quarter of the elements (a §4.2 training step on a CPU: ``docs/training.md``).

    KAP goes right after each conv (paper §4.1) when the model is passed to :func:`kapify.convert`.

    Example:
        >>> net = SmallConvNet(depth=3, width=64, num_classes=10)
        >>> net(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 3,
        width: Union[int, Sequence[int]] = 64,
        kernel_size: int = 3,
        num_classes: int = 10,
        in_chans: int = 3,
        downsample: bool = True,
    ) -> None:
        super().__init__()
        widths = [width] * depth if isinstance(width, int) else list(width)
        if depth < 1 or len(widths) != depth or any(int(w) < 1 for w in widths):
            raise ValueError(f"need depth >= 1 and one positive width per block, got depth={depth}, width={width!r}")
        blocks, chans = [], in_chans
        for w in widths:
            layers = [nn.Conv2d(chans, w, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(w)]
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)] if downsample else [nn.ReLU(inplace=True)]
            blocks.append(nn.Sequential(*layers))
            chans = w
        self.features = nn.Sequential(*blocks)
        self.num_classes = num_classes
        self.num_features = chans
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_convnet(**kwargs) -> SmallConvNet:
    """Factory used by ``kapify.create_model("kapify/small_convnet", depth=3, width=64)``."""
    return SmallConvNet(**kwargs)
