"""Kernel average / max pooling: pooling along the *channel* dimension (paper §3.2, §A.1).

The C channels are laid out on a :class:`~kapify.layers.grid.ChannelGrid` (a 1-D line by default)
and every output channel pools the ``K`` (line) or ``K x K`` (grid) neighbours centred on
``(S*i, S*j)``. Positions outside the grid are padding: an average counts only real channels, a
max ignores the padding. A pool may pass on only the first ``keep`` pooled channels: a conv whose
width is fixed at a non-square C gets the next square number of filters, pooled on a full square
sheet, of which the layer passes on C (``kapify.convert(grid="square")``; the rest are spare filters).

The op runs as one 2-D spatial pooling over a free view of the tensor in which the channel grid
is the pooled plane and every spatial position is a "channel" of the pooling kernel, so contiguous
and channels-last inputs are read once and written once, without a copy.
"""

from __future__ import annotations

import math
from typing import List, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .grid import ChannelGrid

__all__ = [
    "channel_pool",
    "KernelAvgPool",
    "KernelMaxPool",
    "PoolMode",
    "check_keep",
    "check_kernel_size",
    "check_stride",
]

PoolMode = Literal["avg", "max"]
GridLike = Union[ChannelGrid, Tuple[int, int], None]


def check_kernel_size(kernel_size: int) -> int:
    """Return ``kernel_size`` if it is a positive odd integer, else raise a ``ValueError``."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"KAP kernel size must be a positive odd integer (the window is centred on each channel), "
            f"got {kernel_size!r}; use e.g. 3 or 5"
        )
    return kernel_size


def check_stride(stride: int) -> int:
    """Return ``stride`` if it is a positive integer, else raise a ``ValueError``."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"KAP stride must be a positive integer, got {stride!r}")
    return stride


def _as_grid(grid: GridLike) -> Optional[ChannelGrid]:
    if grid is None or isinstance(grid, ChannelGrid):
        return grid
    if isinstance(grid, (tuple, list)) and len(grid) == 2:
        return ChannelGrid(int(grid[0]), int(grid[1]))
    raise ValueError(f"grid must be None (1-D), a (rows, cols) pair or a ChannelGrid, got {grid!r}")


def channel_pool(
    x: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    grid: GridLike = None,
    mode: PoolMode = "avg",
    keep: Optional[int] = None,
) -> torch.Tensor:
    """Pool ``x`` of shape (N, C, *spatial) along C, laid out on ``grid`` (None: a line).

    Returns a tensor of shape (N, C', *spatial) with C' = ``grid.pooled(stride).channels``, or its
    first ``keep`` channels.

    Example:
        >>> x = torch.arange(4.0).view(1, 4)
        >>> channel_pool(x, 3)          # means of [0,1], [0,1,2], [1,2,3], [2,3]
        tensor([[0.5000, 1.0000, 2.0000, 2.5000]])
    """
    check_kernel_size(kernel_size)
    check_stride(stride)
    if x.dim() < 2:
        raise ValueError(f"channel pooling needs an input of shape (N, C, ...), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    layout = _as_grid(grid) or ChannelGrid(1, c)
    if layout.channels != c:
        raise ValueError(
            f"channel grid {layout} holds {layout.channels} channels but the input has C={c} "
            f"(input shape {tuple(x.shape)}); pass a grid with rows * cols == C"
        )
    if mode not in ("avg", "max"):
        raise ValueError(f"pool mode must be 'avg' or 'max', got {mode!r}")
    kernel, step, pad = pool_window(layout, kernel_size, stride)
    out_channels = layout.pooled(stride).channels
    check_keep(keep, out_channels)
    if spatial and x.stride(1) == 1:
        # channels-last: (N, *spatial, C) is contiguous; pool the (rows, cols) plane per position.
        z = x.movedim(1, -1).reshape(n, math.prod(spatial), layout.rows, layout.cols)
        y = pool_plane(z, kernel, step, pad, mode == "avg").reshape(n, *spatial, out_channels).movedim(-1, 1)
    else:
        y = pool_grid(x, layout.rows, layout.cols, out_channels, kernel, step, pad, mode == "avg")
    return y if keep is None else y[:, :keep]


def check_keep(keep: Optional[int], pooled: int) -> None:
    """Raise a ``ValueError`` unless ``keep`` is None or a channel count in [1, ``pooled``]."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= pooled):
        raise ValueError(
            f"keep must be None (pass on every pooled channel) or a count in [1, {pooled}] "
            f"(the pool outputs {pooled} channels), got {keep!r}"
        )


def pool_window(layout: ChannelGrid, kernel_size: int, stride: int) -> Tuple[List[int], List[int], List[int]]:
    """(kernel, stride, padding) of the 2-D pooling over ``layout``'s (rows, cols) plane: K x K on a
    grid, 1 x K on a line; padding K // 2 on each side."""
    if layout.is_line:
        return [1, kernel_size], [1, stride], [0, kernel_size // 2]
    return [kernel_size] * 2, [stride] * 2, [kernel_size // 2] * 2


def pool_plane(z: torch.Tensor, kernel: List[int], step: List[int], pad: List[int], average: bool) -> torch.Tensor:
    """Average (padding not counted) or max pooling over the last two dims of ``z``."""
    if not average:
        return F.max_pool2d(z, kernel, step, pad)
    if torch.jit.is_scripting():  # TorchScript (kapify.surgery.scripting) takes torch's pooling
        return F.avg_pool2d(z, kernel, step, pad, count_include_pad=False)
    if _box_route(z, step):
        return box_mean(z, kernel)
    return F.avg_pool2d(z, kernel, step, pad, count_include_pad=False)


# Where box_mean beats torch's pooling kernel: a contiguous (N, L, rows, cols) plane (a channels-last
# input's view) with rows of at least 16 channels. Measured on a 2-core Xeon, bf16, forward + backward
# (benchmarks/cpu_noise_and_pool_ops.py): 2.7-3.2x faster on 16x16 and 16x32 planes, 1.05x on 8x8 ones
# (no gain there); on the channels-last plane of a contiguous input torch's kernel was 2x faster.
BOX_MIN_COLS = 16


@torch.jit.unused
def _box_route(z: torch.Tensor, step: List[int]) -> bool:
    """Whether ``box_mean`` pools ``z``."""
    return step == [1, 1] and z.shape[-1] >= BOX_MIN_COLS and z.is_contiguous()


def _box_sum(z: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sums over a centred window of ``k`` (odd) along ``dim``, zero padding: a copy and two shifted adds per offset."""
    out = z.clone()
    n = z.shape[dim]
    for shift in range(1, min(k // 2, n - 1) + 1):
        out.narrow(dim, shift, n - shift).add_(z.narrow(dim, 0, n - shift))
        out.narrow(dim, 0, n - shift).add_(z.narrow(dim, shift, n - shift))
    return out


def _inverse_counts(rows: int, cols: int, kernel: List[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """1 / (real positions under each centred window) on a (rows, cols) plane: the average's divisor."""
    per_dim = []
    for size, k in zip((rows, cols), kernel):
        i = torch.arange(size, device=device)
        per_dim.append((torch.clamp(i + k // 2, max=size - 1) - torch.clamp(i - k // 2, min=0) + 1).to(dtype))
    return 1.0 / (per_dim[0][:, None] * per_dim[1][None, :])


class _BoxMean(torch.autograd.Function):
    """``F.avg_pool2d(z, kernel, 1, kernel // 2, count_include_pad=False)`` as two 1-D box sums and one
    scale: elementwise passes, 2-3x faster than torch's CPU pooling kernels, forward and backward
    (the backward is the adjoint: the same box sums of the scaled gradient). Half-precision inputs are
    summed in float32 and rounded once, as torch's pooling does."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, kernel: List[int]) -> torch.Tensor:  # type: ignore[override]
        work = torch.float64 if z.dtype == torch.float64 else torch.float32
        scale = _inverse_counts(z.shape[-2], z.shape[-1], kernel, z.device, work)
        ctx.save_for_backward(scale)
        ctx.kernel, ctx.dtype = kernel, z.dtype
        return _box_sums(z.to(work), kernel).mul_(scale).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return _box_sums(grad.to(scale.dtype) * scale, ctx.kernel).to(ctx.dtype), None


def _box_sums(z: torch.Tensor, kernel: List[int]) -> torch.Tensor:
    return _box_sum(_box_sum(z, kernel[1], -1), kernel[0], -2)


@torch.jit.unused
def box_mean(z: torch.Tensor, kernel: List[int]) -> torch.Tensor:
    """Mean over a centred ``kernel`` = (kh, kw) window (odd sizes) of the last two dims of ``z``, stride 1,
    padding not counted (what KAP computes on a channel grid).

    Example:
        >>> z = torch.randn(2, 5, 4, 6, dtype=torch.float64)
        >>> torch.allclose(box_mean(z, [3, 3]), F.avg_pool2d(z, 3, 1, 1, count_include_pad=False))
        True
    """
    return _BoxMean.apply(z, kernel)


def pool_grid(
    x: torch.Tensor,
    rows: int,
    cols: int,
    out_channels: int,
    kernel: List[int],
    step: List[int],
    pad: List[int],
    average: bool,
) -> torch.Tensor:
    """Pool ``x`` (N, rows * cols, *spatial) over its (rows, cols) channel grid: (N, rows, cols, L) viewed
    as (N, L, rows, cols) is a channels-last 2-D image. TorchScript compiles it (kapify.surgery.scripting)."""
    n, spatial = x.shape[0], list(x.shape[2:])
    length = 1
    for size in spatial:
        length *= size
    y = pool_plane(x.reshape(n, rows, cols, length).permute(0, 3, 1, 2), kernel, step, pad, average)
    return y.permute(0, 2, 3, 1).reshape([n, out_channels] + spatial)


class _ChannelPool(nn.Module):
    mode: PoolMode

    def __init__(self, kernel_size: int, stride: int = 1, grid: GridLike = None, keep: Optional[int] = None) -> None:
        super().__init__()
        self.kernel_size = check_kernel_size(kernel_size)
        self.stride = check_stride(stride)
        self.grid = _as_grid(grid)
        if keep is not None:
            if self.grid is None:
                raise ValueError("keep (pass on the first channels of a sheet) needs a grid: the sheet's size")
            check_keep(keep, self.grid.pooled(self.stride).channels)
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_pool(x, self.kernel_size, self.stride, self.grid, self.mode, self.keep)

    def out_channels(self, channels: int) -> int:
        """Channels left after pooling ``channels`` inputs."""
        return self.keep or (self.grid or ChannelGrid(1, channels)).pooled(self.stride).channels

    def extra_repr(self) -> str:
        layout = f"grid={self.grid}" if self.grid is not None else "grid=line"
        kept = f", keep={self.keep}" if self.keep is not None else ""
        return f"kernel_size={self.kernel_size}, stride={self.stride}, {layout}{kept}"


class KernelAvgPool(_ChannelPool):
    """Kernel average pooling (KAP): mean over channel neighbours; padding has zero weight.

    Example:
        >>> pool = KernelAvgPool(3, grid=(8, 16))
        >>> pool(torch.randn(2, 128, 4, 4)).shape
        torch.Size([2, 128, 4, 4])
        >>> KernelAvgPool(3, grid=(12, 12), keep=128)(torch.randn(2, 144, 4, 4)).shape  # a sheet with 16 spare filters
        torch.Size([2, 128, 4, 4])
    """

    mode: PoolMode = "avg"


class KernelMaxPool(_ChannelPool):
    """Kernel max pooling (KMP): max over channel neighbours; padding is ignored.

    Example:
        >>> KernelMaxPool(3)(torch.tensor([[1.0, 5.0, 2.0, 0.0]]))
        tensor([[5., 5., 5., 2.]])
    """

    mode: PoolMode = "max"
