"""A conv whose width is fixed at a non-square C gets spare filters: ``convert(grid="square")`` gives it
the next square number of filters, pools them on the full square sheet and passes on the first C."""

import copy
import dataclasses

import pytest
import timm
import torch
from torch import nn

import kapify
from kapify.layers import ChannelGrid, KernelAvgPool, pool_conv_weight
from kapify.surgery.kap_conv import attach_kap
from tests.reference import channel_pool_loops


def _sheet_conv(impl: str) -> nn.Module:
    conv = nn.Conv2d(3, 16, 3, padding=1).double()
    return attach_kap(conv, KernelAvgPool(3, grid=(4, 4), keep=10), None, impl)


def test_spare_filter_routes_agree_with_the_reference():
    """Pooling the filters, the output or the smaller of the two passes on the same first 10 channels, with the
    same gradients; blending mixes the pooled channels with the conv's first 10."""
    convs = {impl: _sheet_conv(impl) for impl in ("activation", "weight", "auto")}
    for c in convs.values():
        c.load_state_dict(convs["activation"].state_dict())
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    plain = nn.Conv2d.forward(convs["activation"], x)
    want = channel_pool_loops(plain, 3, 1, (4, 4), "avg")[:, :10]
    grads = []
    for impl, conv in convs.items():
        out = conv(x)
        torch.testing.assert_close(out, want)
        grads.append(torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias)))
    for got in grads[1:]:
        torch.testing.assert_close(got, grads[0])
    w, b = pool_conv_weight(convs["weight"].weight, convs["weight"].bias, 3, 1, (4, 4), keep=10)
    assert w.shape[0] == b.shape[0] == 10
    for impl in ("activation", "weight"):
        kapify.set_blend(convs[impl], 0.25)
        torch.testing.assert_close(convs[impl](x), 0.75 * plain[:, :10] + 0.25 * want)


@pytest.fixture(scope="module")
def sknet():
    """SKNet's attention (fc_select) outputs 2 x the stream width, split into one weight per branch: never a square."""
    torch.manual_seed(0)
    return timm.create_model("skresnet18", pretrained=False, num_classes=10).eval()


def test_convert_gives_fixed_widths_spare_filters_and_keeps_the_function(sknet):
    x = torch.rand(2, 3, 64, 64)
    kap = kapify.convert(sknet, k=3, sigma=0.1, example_input=x).eval()
    records = kapify.get_config(kap).layers
    spare = [r for r in records if r.out_channels != r.pooled_channels]
    assert [r.name for r in spare] == kapify.summary(kap).spare_filters
    assert len(spare) == 8 and all(r.name.endswith("attn.fc_select") for r in spare)
    for r in records:  # every sheet is square; a spare-filter sheet is the next square above the width it passes on
        grid = ChannelGrid.parse(r.grid)
        assert grid.rows == grid.cols and grid.channels == r.out_channels == kap.get_submodule(r.name).weight.shape[0]
        if r in spare:
            assert (grid.rows - 1) ** 2 < r.pooled_channels < grid.channels and r.name in kapify.get_config(
                kap
            ).fixed_widths
    assert "on a square sheet with spare filters" in str(kapify.summary(kap))
    with torch.no_grad():
        out = kap(x)
        # k=1 and no noise: the spare filters pass nothing on, so the plain function is kept
        torch.testing.assert_close(
            kapify.convert(sknet, k=1, sigma=0.0, example_input=x).eval()(x), sknet(x), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(kapify.fold(kap)(x), out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.jit.script(copy.deepcopy(kap))(x), out, rtol=1e-4, atol=1e-5)
    kap.train()
    kap(x).sum().backward()
    assert (
        kap.get_submodule(spare[0].name).weight.grad[spare[0].pooled_channels :].abs().sum() > 0
    )  # spare filters learn


def test_spare_filters_with_kernel_size_multiplier_and_kmp(sknet):
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        wide = kapify.convert(
            sknet, k=1, sigma=0.0, stride=2, example_input=x
        ).eval()  # k=1: the old filters, at the centres
        torch.testing.assert_close(wide(x), sknet(x), rtol=1e-5, atol=1e-5)
        kmp = kapify.convert(sknet, k=3, sigma=0.0, pool="max", example_input=x).eval()
        assert kmp(x).shape == (1, 10) and kapify.summary(kmp).spare_filters == kapify.summary(wide).spare_filters


def test_spare_filters_save_and_load(sknet, tmp_path):
    kap = kapify.convert(sknet, k=3, sigma=0.1).eval()
    kapify.save(kap, tmp_path / "sk.safetensors")
    loaded = kapify.load(tmp_path / "sk.safetensors").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), kap(x))
    assert kapify.summary(loaded).spare_filters == kapify.summary(kap).spare_filters


def test_a_group_that_would_grow_over_max_growth_keeps_its_width():
    """ConViT-tiny's stream (192 = 4 heads of 48) would need 576 channels, the least square of whole heads: 3x the
    width for its one conv. It keeps its width; the conv pools on a 14x14 sheet with 4 spare filters."""
    model = timm.create_model("convit_tiny", pretrained=False, num_classes=10).eval()
    x = torch.rand(1, 3, 224, 224)
    kap = kapify.convert(model, k=3, sigma=0.0, example_input=x).eval()
    (record,) = kapify.get_config(kap).layers
    assert (record.grid, record.out_channels, record.pooled_channels) == ("14x14", 196, 192)
    assert kap.blocks[0].attn.num_heads == 4 and kap.head.in_features == 192
    summary = kapify.summary(kap)
    assert summary.params_after < 1.02 * summary.params_before
    with torch.no_grad():
        assert kap(x).shape == model(x).shape == (1, 10)


def test_a_checkpoint_from_before_spare_filters_gets_a_clear_error(sknet, tmp_path):
    """A version-1 checkpoint recorded fixed widths with rectangular grids: the rebuilt model differs, and the error
    says which kapify wrote it."""
    kap = kapify.convert(sknet, k=3, sigma=0.1)
    config = kapify.get_config(kap)
    config.version, config.plan = 1, None  # version 1 stored no plan: load converts again
    config.layers = [
        r
        if r.out_channels == r.pooled_channels
        else dataclasses.replace(r, grid="8x16", out_channels=r.pooled_channels)
        for r in config.layers
    ]
    kapify.save(kap, tmp_path / "old.safetensors")
    current = next(f.default for f in dataclasses.fields(kapify.KapConfig) if f.name == "version")
    with pytest.raises(ValueError, match=f"config version 1, this kapify writes {current}"):
        kapify.load(tmp_path / "old.safetensors")
