"""KAP on the weights (Eq. 3) equals KAP on the activations; fold bakes it into plain convs."""

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import kapify
from kapify.layers import KernelAvgPool, KernelMaxPool, channel_pool, pool_conv_weight
from kapify.surgery.kap_conv import attach_kap, weight_poolable

CONVS = [
    (nn.Conv2d(3, 12, 3, padding=1), (3, 4), 3, (2, 3, 7, 6)),
    (nn.Conv2d(4, 10, (3, 2), stride=2, bias=False), (2, 5), 5, (2, 4, 9, 8)),
    (nn.Conv2d(2, 9, 3, padding=1, padding_mode="reflect", dilation=1), None, 3, (1, 2, 5, 5)),
    (nn.Conv2d(3, 16, 3, dilation=2), (4, 4), 1, (2, 3, 9, 9)),
    (nn.Conv1d(3, 8, 3), (2, 4), 3, (2, 3, 11)),
    (nn.Conv3d(2, 6, 2), (2, 3), 3, (1, 2, 4, 5, 3)),
]


@pytest.mark.parametrize("conv,grid,k,shape", CONVS)
def test_weight_pooling_equals_activation_pooling(conv, grid, k, shape):
    conv = conv.double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    act = channel_pool(conv(x), k, 1, grid, "avg")
    w, b = pool_conv_weight(conv.weight, conv.bias, k, 1, grid)
    wt = conv._conv_forward(x, w, b)
    torch.testing.assert_close(wt, act)
    g = torch.randn_like(act)
    grads_act = torch.autograd.grad(act, [x, conv.weight], g)
    grads_wt = torch.autograd.grad(wt, [x, conv.weight], g)
    for a, b_ in zip(grads_act, grads_wt):
        torch.testing.assert_close(a, b_)
    assert torch.autograd.gradcheck(
        lambda t: pool_conv_weight(t, None, k, 1, grid)[0], (conv.weight.detach().requires_grad_(),)
    )


def test_weight_pooling_with_stride_matches():
    w, b = torch.randn(16, 3, 3, 3, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pw, pb = pool_conv_weight(w, b, 3, 2, (4, 4))
    assert pw.shape == (4, 3, 3, 3)
    torch.testing.assert_close(
        nn.functional.conv2d(x, pw, pb), channel_pool(nn.functional.conv2d(x, w, b), 3, 2, (4, 4))
    )


def test_auto_picks_weight_only_where_exact():
    plain, grouped = nn.Conv2d(4, 8, 3), nn.Conv2d(4, 8, 3, groups=2)
    std = timm.layers.StdConv2d(4, 8, 3)
    avg, mx = KernelAvgPool(3, grid=(2, 4)), KernelMaxPool(3, grid=(2, 4))
    assert weight_poolable(plain, avg) and not weight_poolable(plain, mx)
    assert not weight_poolable(grouped, avg) and not weight_poolable(std, avg)
    with pytest.raises(ValueError, match="impl='activation'"):
        attach_kap(grouped, avg, None, "weight")
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=4)
    impls = {r.name: r.impl for r in kapify.get_config(kapify.convert(model)).layers}
    assert impls["features.0.0"] == "auto" and impls["features.1.conv.0.0"] == "activation"  # depthwise
    with pytest.raises(ValueError, match="cannot pool its weights"):
        kapify.convert(model, impl="weight")


def test_auto_pools_the_smaller_tensor_and_agrees_with_both_routes():
    """impl="auto" pools the filters when they are smaller than the call's output, else the output."""
    conv = nn.Conv2d(16, 16, 3, padding=1, stride=2).double()  # filters: 2304 numbers
    routes = {}
    for impl in ("auto", "weight", "activation"):
        routes[impl] = attach_kap(copy.deepcopy(conv), KernelAvgPool(3, grid=(4, 4)), None, impl)
    small, large = torch.randn(1, 16, 8, 8, dtype=torch.float64), torch.randn(3, 16, 16, 16, dtype=torch.float64)
    assert not routes["auto"]._filters_smaller(small)  # output 1x16x4x4 = 256 numbers
    assert routes["auto"]._filters_smaller(large)  # output 3x16x8x8 = 3072 numbers
    for x in (small, large):
        x.requires_grad_(True)
        outs = {impl: m(x) for impl, m in routes.items()}
        grads = {impl: torch.autograd.grad(o.square().sum(), (x, routes[impl].weight)) for impl, o in outs.items()}
        for impl in ("weight", "activation"):
            torch.testing.assert_close(outs["auto"], outs[impl])
            torch.testing.assert_close(grads["auto"], grads[impl])


@pytest.mark.parametrize("name", ["resnet18", "seresnet18"])
def test_models_agree_between_impls(name):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    outs, grads = [], []
    for impl in ("activation", "weight"):
        kap = kapify.convert(model, sigma=0.0, impl=impl, grid="rect").train()
        out = kap(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(kap.layer1[0].conv1.weight.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "library,name,pool",
    [
        ("timm", "resnet18", "avg"),
        ("torchvision", "mobilenet_v2", "avg"),
        ("timm", "resnet18", "max"),
        ("timm", "resnetv2_50x1_bit", "avg"),
    ],
)
def test_fold_keeps_eval_outputs(library, name, pool):
    model = kapify.create_model(f"{library}/{name}", num_classes=10)
    kap = kapify.convert(model, k=3, sigma=0.1, pool=pool).eval()
    folded = kapify.fold(kap)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), kap(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, kapify.GaussianNoise) for m in folded.modules())
    assert kapify.set_noise(folded, True) == 0
    records = kapify.get_config(folded).layers
    for r in records:
        conv = folded.get_submodule(r.name)
        if r.impl == "folded":
            assert type(conv) in (nn.Conv2d,) and not hasattr(conv, "kap_pool")
        else:
            assert type(conv).__name__.startswith("Kap")
    assert any(r.impl == "folded" for r in records) == (pool == "avg")


def test_fold_export_and_save_load(tmp_path):
    kap = kapify.convert(kapify.create_model("timm/resnet18", num_classes=10)).eval()
    folded = kapify.fold(kap)
    assert not any(type(m).__name__.startswith("Kap") for m in folded.modules())
    x = torch.randn(1, 3, 32, 32)
    exported = torch.export.export(folded, (x,))
    torch.testing.assert_close(exported.module()(x), folded(x))
    kapify.save(folded, tmp_path / "f.safetensors")
    back = kapify.load(tmp_path / "f.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(back(x), folded(x))
    with pytest.raises(ValueError, match="already folded"):
        kapify.fold(folded)
    with pytest.raises(ValueError, match="not converted"):
        kapify.fold(nn.Conv2d(3, 3, 1))
