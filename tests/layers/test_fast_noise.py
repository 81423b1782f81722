"""kapify's compiled CPU noise (kapify/layers/fast_noise.py): exact i.i.d. N(0, sigma^2), independent of
how the elements are sliced across threads, reproducible from torch's seed, autograd- and layout-safe."""

import math
import shutil

import pytest
import torch
from scipy import stats

from kapify.layers import GaussianNoise, fast_noise
from kapify.layers.fast_noise import add_gaussian, fast_noise_available, kernel_normals, torch_generator

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")

N = 1 << 21


def test_kernel_builds_here():
    assert fast_noise_available()


def test_normals_have_the_moments_and_distribution_of_n01():
    z = kernel_normals(N, seed=12345).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(N)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / N)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / N)  # skewness 0
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / N)  # kurtosis 3
    assert stats.kstest(z[:200_000].numpy(), "norm").pvalue > 1e-4
    assert z.abs().max().item() > 4.5  # the tails are there (P(|z| > 4.5) ~ 7e-6 per number)


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 64, 256, 4096])
def test_neighbours_are_uncorrelated(lag):
    # neighbours come from the same Philox block, the same Box-Muller pair, or adjacent counters
    z = kernel_normals(N, seed=7).double()
    corr = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(N)


def test_adjacent_seeds_are_uncorrelated():
    a, b = kernel_normals(N, seed=1000).double(), kernel_normals(N, seed=1001).double()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(N)


@pytest.mark.parametrize("start", [0, 1, 255, 256, 70_001])
def test_any_slice_and_thread_count_gives_the_same_numbers(start):
    whole = kernel_normals(300_000, seed=3)
    for threads in (1, 2, 3):
        part = kernel_normals(300_000 - start, seed=3, start=start, threads=threads)
        assert torch.equal(part, whole[start:])


def test_reproducible_from_torch_seed_and_fresh_each_call():
    x = torch.zeros(4, 16, 8, 8)
    noise = GaussianNoise(0.1).train()
    torch.manual_seed(0)
    first, second = noise(x), noise(x)
    torch.manual_seed(0)
    assert torch.equal(noise(x), first) and torch.equal(noise(x), second)
    assert not torch.equal(first, second)


def test_bf16_is_the_float32_sum_rounded():
    x = torch.randn(8, 32, 16, 16)
    torch.manual_seed(5)
    low = add_gaussian(x.bfloat16(), 0.1)
    torch.manual_seed(5)
    high = add_gaussian(x.bfloat16().float(), 0.1)
    assert low.dtype == torch.bfloat16 and torch.equal(low, high.bfloat16())
    special = torch.tensor([float("nan"), float("inf"), -float("inf")] * 100, dtype=torch.bfloat16)
    out = add_gaussian(special, 0.1)
    assert out[0::3].isnan().all() and (out[1::3] == float("inf")).all() and (out[2::3] == -float("inf")).all()


def test_layouts_views_and_gradient():
    x = torch.randn(4, 24, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    y = add_gaussian(x, 0.2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert 0.15 < (y - x).std().item() < 0.25
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    view = torch.randn(4, 48, 8, 8)[:, ::2]  # neither contiguous nor dense
    torch.manual_seed(1)
    noisy_view = add_gaussian(view, 0.2)
    torch.manual_seed(1)
    assert torch.equal(noisy_view, add_gaussian(view.contiguous(), 0.2))
    assert torch.equal(view, view.clone())  # the input is not written


def test_where_the_kernel_does_not_apply_torch_draws_the_noise():
    for x in (torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float16), torch.zeros(0)):
        assert add_gaussian(x, 0.1) is None
    x = torch.zeros(50_000)
    with torch_generator():
        assert add_gaussian(x, 0.1) is None
        assert 0.09 < GaussianNoise(0.1).train()(x).std().item() < 0.11
    assert add_gaussian(x, 0.1) is not None


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("KAPIFY_CACHE_DIR", str(tmp_path))
    fast_noise._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="falls back to torch"):
            assert not fast_noise_available()
        assert add_gaussian(torch.zeros(10), 0.1) is None
        assert GaussianNoise(0.5).train()(torch.zeros(20_000)).std().item() > 0.4
        monkeypatch.setenv("KAPIFY_FAST_NOISE", "0")
        monkeypatch.delenv("CC")
        fast_noise._library.cache_clear()
        assert not fast_noise_available()
    finally:
        monkeypatch.undo()
        fast_noise._library.cache_clear()
    assert fast_noise_available()


def test_reuse_input_writes_in_place_only_where_autograd_allows():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    y = conv(x)  # the conv's backward does not read its output
    z = add_gaussian(y, 0.1, reuse_input=True)
    assert z.data_ptr() == y.data_ptr()
    z.square().sum().backward()
    (expected,) = torch.autograd.grad(conv(x), x, grad_outputs=2 * z.detach())  # d(z^2)/dz = 2z, and dz/dy = 1
    assert torch.allclose(x.grad, expected, atol=1e-5)
    for y in (
        torch.sigmoid(torch.randn(4, 100, requires_grad=True)),  # sigmoid's backward reads its output
        torch.randn(4, 100, requires_grad=True),  # a leaf
        torch.randn(4, 200)[:, ::2],  # a view
        torch.randn(4, 100).t(),
    ):  # a view too
        out = add_gaussian(y, 0.1, reuse_input=True)
        assert out.data_ptr() != y.data_ptr()
    sig_in = torch.randn(4, 100, requires_grad=True)
    add_gaussian(torch.sigmoid(sig_in), 0.1, reuse_input=True).sum().backward()
    assert torch.allclose(sig_in.grad, torch.sigmoid(sig_in) * (1 - torch.sigmoid(sig_in)))
