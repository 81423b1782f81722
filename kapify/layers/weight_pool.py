"""KAP as a weight reparametrisation (paper Eq. 3): pooling a conv's output channels equals a conv
whose filters (and biases) are pooled the same way, because a conv is linear in its weights.

The pooling runs on the filter bank viewed as (1, C_out, C_in/g * prod(kernel)), so it costs about
K*K*|W| operations, not a dense C_out x C_out matrix product.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .channel_pool import GridLike, channel_pool

__all__ = ["pool_conv_weight"]


def pool_conv_weight(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    kernel_size: int,
    stride: int = 1,
    grid: GridLike = None,
    keep: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Average the filters of a conv weight (C_out, ...) along C_out like :func:`channel_pool` would
    average its output channels (and keep the first ``keep``). Differentiable: gradients flow to
    ``weight`` and ``bias``.

    Example:
        >>> import torch.nn.functional as F
        >>> w, b, x = torch.randn(16, 3, 3, 3), torch.randn(16), torch.randn(1, 3, 8, 8)
        >>> pw, pb = pool_conv_weight(w, b, 3, grid=(4, 4))
        >>> torch.allclose(F.conv2d(x, pw, pb), channel_pool(F.conv2d(x, w, b), 3, grid=(4, 4)), atol=1e-5)
        True
    """
    c_out = weight.shape[0]
    pooled = channel_pool(weight.reshape(1, c_out, -1), kernel_size, stride, grid, "avg", keep)
    new_weight = pooled.reshape(pooled.shape[1], *weight.shape[1:])
    new_bias = None if bias is None else channel_pool(bias.reshape(1, c_out), kernel_size, stride, grid, "avg", keep)[0]
    return new_weight, new_bias
