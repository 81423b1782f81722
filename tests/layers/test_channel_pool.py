import pytest
import torch

from kapify.layers import ChannelGrid, KernelAvgPool, KernelMaxPool, channel_pool, rect_grid
from tests.reference import channel_pool_loops

# (channels, grid) with grid None = a line: squares, rectangles, tiny and prime layouts
LAYOUTS = [
    (16, (4, 4)),
    (12, (3, 4)),
    (12, (4, 3)),
    (10, (2, 5)),
    (2, (1, 2)),
    (2, (2, 1)),
    (1, (1, 1)),
    (9, None),
    (8, None),
    (1, None),
    (7, (1, 7)),
]
SPATIAL = [(), (5,), (3, 4), (2, 3, 2)]


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("channels,grid", LAYOUTS)
def test_matches_loop_reference(mode, k, stride, channels, grid):
    gen = torch.Generator().manual_seed(hash((mode, k, stride, channels, grid)) % 2**31)
    for spatial in SPATIAL:
        x = torch.randn(2, channels, *spatial, generator=gen)
        got = channel_pool(x, k, stride, grid, mode)
        want = channel_pool_loops(x, k, stride, grid, mode)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_channels_last_matches_contiguous(mode):
    x = torch.randn(3, 24, 5, 7)
    want = channel_pool(x, 3, 2, (4, 6), mode)
    got = channel_pool(x.to(memory_format=torch.channels_last), 3, 2, (4, 6), mode)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)
    x5 = torch.randn(2, 16, 3, 4, 5)
    got5 = channel_pool(x5.to(memory_format=torch.channels_last_3d), 3, 1, (4, 4), mode)
    torch.testing.assert_close(got5, channel_pool(x5, 3, 1, (4, 4), mode))


def test_non_contiguous_input():
    x = torch.randn(2, 5, 6, 12).transpose(1, 3)  # (2, 12, 6, 5), neither layout
    torch.testing.assert_close(channel_pool(x, 3, 1, (3, 4)), channel_pool_loops(x, 3, 1, (3, 4), "avg"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_low_precision(dtype, mode):
    x = torch.randn(2, 12, 4, 4)
    got = channel_pool(x.to(dtype), 3, 1, (3, 4), mode)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), channel_pool_loops(x, 3, 1, (3, 4), mode), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize(
    "k,stride,grid,spatial",
    [(3, 1, (3, 4), (3, 2)), (5, 2, (4, 4), (2,)), (3, 1, None, ()), (3, 2, (2, 5), (2, 2)), (5, 1, (1, 2), (2,))],
)
def test_gradcheck(mode, k, stride, grid, spatial):
    channels = grid[0] * grid[1] if grid else 7
    x = torch.randn(2, channels, *spatial, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: channel_pool(t, k, stride, grid, mode), (x,))
    ref = channel_pool_loops(x, k, stride, grid, mode)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    (g,) = torch.autograd.grad(channel_pool(x, k, stride, grid, mode).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_modules_and_output_channels():
    pool = KernelAvgPool(3, stride=2, grid=(8, 16))
    assert pool(torch.randn(2, 128, 3, 3)).shape == (2, 32, 3, 3)
    assert pool.out_channels(128) == 32
    assert KernelMaxPool(3)(torch.randn(2, 10)).shape == (2, 10)
    assert "grid=8x16" in repr(pool)


def test_rect_grid():
    assert rect_grid(128) == ChannelGrid(8, 16)
    assert rect_grid(64) == ChannelGrid(8, 8)
    assert rect_grid(7) == ChannelGrid(1, 7)
    for c in range(1, 300):
        g = rect_grid(c)
        assert g.channels == c and g.rows <= g.cols
        assert all(c % r for r in range(g.rows + 1, int(c**0.5) + 1))  # no squarer factorisation


@pytest.mark.parametrize("k", [0, 2, 4, -1, 1.0, True])
def test_bad_kernel_size(k):
    with pytest.raises(ValueError, match="odd"):
        KernelAvgPool(k)


def test_bad_grid_and_input():
    with pytest.raises(ValueError, match="rows \\* cols == C"):
        channel_pool(torch.randn(2, 10, 3), 3, 1, (3, 3))
    with pytest.raises(ValueError, match="shape \\(N, C"):
        channel_pool(torch.randn(10), 3)
    with pytest.raises(ValueError, match="stride"):
        KernelAvgPool(3, stride=0)
    with pytest.raises(ValueError, match="'avg' or 'max'"):
        channel_pool(torch.randn(2, 4), 3, mode="median")


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize(
    "grid,stride,keep", [((3, 3), 1, 7), ((4, 4), 1, 10), ((4, 4), 2, 3), ((5, 5), 1, 1), ((2, 3), 1, 5)]
)
def test_keep_passes_on_the_first_pooled_channels(mode, grid, stride, keep):
    """A sheet with spare channels: pool the whole sheet, pass on the first ``keep`` (any memory layout)."""
    x = torch.randn(2, grid[0] * grid[1], 3, 5, dtype=torch.float64, requires_grad=True)
    want = channel_pool_loops(x, 3, stride, grid, mode)[:, :keep]
    for t in (x, x.to(memory_format=torch.channels_last)):
        torch.testing.assert_close(channel_pool(t, 3, stride, grid, mode, keep), want)
    pool = (KernelAvgPool if mode == "avg" else KernelMaxPool)(3, stride, grid, keep)
    torch.testing.assert_close(pool(x), want)
    assert pool.out_channels(grid[0] * grid[1]) == keep and f"keep={keep}" in repr(pool)
    assert torch.autograd.gradcheck(lambda t: channel_pool(t, 3, stride, grid, mode, keep), (x,))
    (g,), (g_ref,) = torch.autograd.grad(pool(x).sum(), x), torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_bad_keep():
    with pytest.raises(ValueError, match="keep must be None .* in \\[1, 16\\]"):
        KernelAvgPool(3, grid=(4, 4), keep=17)
    with pytest.raises(ValueError, match="in \\[1, 4\\]"):
        channel_pool(torch.randn(2, 16), 3, 2, (4, 4), keep=5)
    with pytest.raises(ValueError, match="needs a grid"):
        KernelAvgPool(3, keep=3)


# The box-sum route (kapify.layers.channel_pool.box_mean): average pools of stride 1 on a channels-last
# input whose grid has rows of >= BOX_MIN_COLS channels. Odd and even sizes, rows shorter than the window.
BOX_LAYOUTS = [(32, (2, 16)), (51, (3, 17)), (256, (16, 16)), (20, None), (18, (1, 18)), (68, (4, 17))]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("channels,grid", BOX_LAYOUTS)
def test_box_route_matches_loop_reference(k, channels, grid):
    from kapify.layers.channel_pool import BOX_MIN_COLS

    assert (grid or (1, channels))[1] >= BOX_MIN_COLS  # these layouts take the box route
    x = torch.randn(2, channels, 3, 2).to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        channel_pool(x, k, 1, grid, "avg"), channel_pool_loops(x, k, 1, grid, "avg"), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("k,grid", [(3, (3, 17)), (5, (2, 16)), (3, None)])
def test_box_route_gradcheck(k, grid):
    channels = grid[0] * grid[1] if grid else 19
    x = torch.randn(2, channels, 2, 3, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: channel_pool(t, k, 1, grid, "avg"), (x,))
    (g_ref,) = torch.autograd.grad(channel_pool_loops(x, k, 1, grid, "avg").square().sum(), x)
    (g,) = torch.autograd.grad(channel_pool(x, k, 1, grid, "avg").square().sum(), x)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 4, 1, 7), (3, 2, 8, 2), (2, 2, 4, 4)])
@pytest.mark.parametrize("kernel", [[1, 3], [3, 3], [5, 3], [3, 1], [7, 5]])
def test_box_mean_is_avg_pool_without_padding_counts(shape, kernel):
    from kapify.layers.channel_pool import box_mean

    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    want = torch.nn.functional.avg_pool2d(z, kernel, 1, [kernel[0] // 2, kernel[1] // 2], count_include_pad=False)
    torch.testing.assert_close(box_mean(z, kernel), want)
    assert torch.autograd.gradcheck(lambda t: box_mean(t, kernel), (z,))
    low = box_mean(z.detach().bfloat16(), kernel)  # summed in float32, rounded once
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low, box_mean(z.detach().bfloat16().double(), kernel).bfloat16(), rtol=0, atol=0)
