"""Every conv of common timm / torchvision models is followed by a pool, forward and backward work."""

import pytest
import timm
import torch
import torchvision

import kapify
from kapify.layers import channel_pool
from kapify.surgery.kap_conv import original_class
from tests.helpers import ZOO, build, called_convs


@pytest.mark.parametrize("library,name", ZOO)
def test_every_conv_is_pooled(library, name):
    model = build(library, name).eval()
    size = 64 if name != "vgg11_bn" or library == "timm" else 32
    x = torch.randn(2, 3, size, size)
    kap = kapify.convert(model, k=3, sigma=0.1, example_input=x[:1])
    want = called_convs(model, x)
    got = called_convs(kap.eval(), x)
    assert want.keys() == got.keys() and len(want) > 0
    for conv_name, (inputs, out) in got.items():
        conv = kap.get_submodule(conv_name)
        raw = original_class(conv).forward(conv, *inputs)  # the conv alone, without the attached pool
        grid = tuple(int(v) for v in conv.kap_pool.grid.__str__().split("x"))
        torch.testing.assert_close(out, channel_pool(raw, 3, 1, grid, "avg", conv.kap_pool.keep))
    assert kap(x).shape == model(x).shape == (2, 10)
    kap.train()
    loss = kap(x).logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for p in kap.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_kmp_and_noise_only_and_line_grid():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    kmp = kapify.convert(model, k=5, pool="max", grid="line", sigma=0.0, input_noise=False)
    assert isinstance(kmp.layer1[0].conv1.kap_pool, kapify.KernelMaxPool)
    assert kmp.layer1[0].conv1.kap_pool.grid is None and kmp.layer1[0].conv1.kap_noise is None
    assert not hasattr(kmp, "kapify_input_noise")
    nt = kapify.convert(model, pool=None, sigma=0.1)
    assert nt.conv1.kap_pool is None and nt.conv1.kap_noise.sigma == 0.1
    assert all(r.pool is None and r.grid is None for r in kapify.get_config(nt).layers)


def test_include_exclude():
    model = timm.create_model("resnet18", pretrained=False)
    kap = kapify.convert(model, exclude=["conv1", "*downsample*"])
    names = {r.name for r in kapify.get_config(kap).layers}
    assert "conv1" not in names and not any("downsample" in n for n in names) and "layer1.0.conv1" in names
    only = kapify.convert(model, include="layer4.*")
    assert {r.name for r in kapify.get_config(only).layers} == {
        "layer4.0.conv1",
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    }


def test_k1_without_noise_is_the_identity():
    model = torchvision.models.resnet18(weights=None).eval()
    kap = kapify.convert(model, k=1, sigma=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(kap(x), model(x))


def test_input_noise_only_in_training():
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    kap = kapify.convert(model, k=1, sigma=0.5)
    seen = []
    kap.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    x = torch.zeros(2, 3, 32, 32)
    kap.eval()(x)
    kap.train()(x)
    assert torch.equal(seen[0], x)
    assert 0.4 < seen[1].std().item() < 0.6
