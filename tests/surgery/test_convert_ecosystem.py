"""A converted model keeps working where the original did: timm/torchvision API, state_dict, eval,
torch.compile, autocast, channels_last, DDP."""

import copy
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torchvision

import kapify


@pytest.fixture(scope="module")
def timm_pair():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    return model, kapify.convert(model, k=3, sigma=0.1, grid="rect")  # rect keeps pretrained shapes


def test_timm_api_is_kept(timm_pair):
    model, kap = timm_pair
    assert isinstance(kap, type(model)) and type(kap) is type(model)
    assert kap.pretrained_cfg == model.pretrained_cfg and kap.default_cfg == model.default_cfg
    assert kap.num_classes == 10 and kap.get_classifier().out_features == 10
    x = torch.randn(2, 3, 32, 32)
    kap.eval()
    feats = kap.forward_features(x)
    assert feats.shape == (2, 512, 1, 1)
    square = kapify.convert(model)  # the default re-widens to squares: 512 -> 576 features, same API
    assert square.eval().forward_features(x).shape == (2, 576, 1, 1) and square(x).shape == (2, 10)
    torch.testing.assert_close(kap.forward_head(feats), kap(x))
    kap2 = kapify.convert(model)
    kap2.reset_classifier(5)
    assert kap2(x).shape == (2, 5)


def test_torchvision_class_is_kept():
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=3)
    kap = kapify.convert(model)
    assert type(kap) is torchvision.models.MobileNetV2 and kap.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_state_dict_round_trip(timm_pair):
    model, kap = timm_pair
    assert list(kap.state_dict()) == list(model.state_dict())  # pools and noise add no keys
    other = kapify.convert(timm.create_model("resnet18", pretrained=False, num_classes=10), grid="rect")
    other.load_state_dict(kap.state_dict())
    x = torch.randn(2, 3, 32, 32)
    kap.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(kap(x), other(x))
    pretrained_like = timm.create_model("resnet18", pretrained=False, num_classes=10)
    other.load_state_dict(pretrained_like.state_dict())  # weights of a plain model load as they are


def test_caller_model_is_not_modified():
    model = timm.create_model("resnet18", pretrained=False)
    from tests.helpers import assert_unchanged, state_snapshot

    snap = state_snapshot(model)
    kap = kapify.convert(model)
    assert_unchanged(model, snap)
    assert kap.conv1.weight is not model.conv1.weight and torch.equal(kap.conv1.weight, model.conv1.weight)


def test_eval_is_deterministic_and_train_is_noisy(timm_pair):
    _, kap = timm_pair
    x = torch.randn(2, 3, 32, 32)
    kap.eval()
    with torch.no_grad():
        assert torch.equal(kap(x), kap(x))
        kapify.set_noise(kap, True)
        assert not torch.equal(kap(x), kap(x))
        kapify.set_noise(kap, False)


def test_autocast_and_channels_last(timm_pair):
    _, kap = timm_pair
    kap.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = kap(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = kap(x)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)
        kap_cl = kapify.convert(timm.create_model("resnet18", pretrained=False, num_classes=10), grid="rect")
        kap_cl.load_state_dict(kap.state_dict())
        kap_cl = kap_cl.to(memory_format=torch.channels_last).eval()
        torch.testing.assert_close(kap_cl(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)


def test_ddp_wraps_and_trains():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        kap = kapify.convert(timm.create_model("resnet18", pretrained=False, num_classes=4))
        ddp = torch.nn.parallel.DistributedDataParallel(kap)
        ddp(torch.randn(2, 3, 32, 32)).sum().backward()
        assert kap.conv1.weight.grad is not None
        assert kapify.get_config(ddp) is kapify.get_config(kap)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_compile(timm_pair):
    _, kap = timm_pair
    kap.eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(kap)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), kap(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnetv2_50", "efficientnet_b0"])
def test_fx_feature_extractors_keep_kap_convs_as_leaves(name):
    """timm's FX feature extractor (timm's test-suite check) traces a converted model, runs the pools, and
    backpropagates."""
    from timm.models import FeatureGraphNet

    model = kapify.convert(timm.create_model(name, pretrained=False, num_classes=10), grid="rect").eval()
    features = FeatureGraphNet(model, out_indices=(1, 2)).eval()
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    stages, hooks = {}, []
    for info in model.feature_info[1:3]:
        hooks.append(
            model.get_submodule(info["module"]).register_forward_hook(
                lambda m, i, o, key=info["module"]: stages.__setitem__(key, o)
            )
        )
    model(x)
    for h in hooks:
        h.remove()
    out = features(x)
    assert all(torch.allclose(a, b) for a, b in zip(out, stages.values()))
    sum(o.sum() for o in out).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_torchvision_feature_extractor_on_a_converted_model():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = kapify.convert(torchvision.models.resnet18(num_classes=10), grid="rect").eval()
    graph = create_feature_extractor(model, {"layer2": "mid", "fc": "logits"})
    assert isinstance(
        graph.get_submodule("layer2.0.conv1"), kapify.surgery.kap_conv.KapConvMixin
    )  # a leaf, not traced through
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(graph(x)["logits"], model(x), atol=1e-6)


@pytest.mark.parametrize("name", ["resnet34", "dla34", "resnetv2_50", "convnext_atto", "vit_tiny_patch16_224"])
def test_widened_timm_models_report_their_new_widths(name):
    """timm's test-suite reads feature_info / num_features back and resets heads: after re-widening
    those agree with the tensors the model now produces."""
    model = kapify.convert(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.rand(1, 3, 224, 224)
    shapes = {}

    def record(key):
        def hook(module, inputs, output):  # returns None, so the output is kept
            shapes.setdefault(key, output.shape)

        return hook

    hooks = [model.get_submodule(i["module"]).register_forward_hook(record(i["module"])) for i in model.feature_info]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for info in model.feature_info:
        assert info["num_chs"] in (shapes[info["module"]][1], shapes[info["module"]][-1]), (
            info,
            shapes[info["module"]],
        )
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (1, 5)


@pytest.mark.parametrize("grid", ["rect", "square"])
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto", "repvgg_a2"])
def test_timm_model_suite_checks_hold_after_conversion(name, grid):
    """Assertions of timm's tests/test_models.py, restated: backward reaches every parameter,
    forward_intermediates agrees with feature_info, pre-logits have the reported width, the model
    scripts (TorchScript) with eager's outputs, and a features_only model converts and reports its
    (re-widened) channels. repvgg_a2: no single module reads its input (a two-branch stem), so the
    model itself hosts the input stages."""
    x = torch.rand(2, 3, 64, 64)
    kap = kapify.convert(timm.create_model(name, pretrained=False, num_classes=10), grid=grid, example_input=x).train()
    out = kap(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.mean().backward()
    params = list(kap.parameters())
    assert sum(p.grad is not None for p in params) == len(params)
    kap.eval()
    final, intermediates = kap.forward_intermediates(x)
    assert [t.shape[1] for t in intermediates] == [info["num_chs"] for info in kap.feature_info]
    assert kap.forward_head(final, pre_logits=True).shape[-1] == getattr(kap, "head_hidden_size", kap.num_features)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(copy.deepcopy(kap))(x), kap(x), rtol=1e-4, atol=1e-5)
    features = kapify.convert(
        timm.create_model(name, pretrained=False, features_only=True), grid=grid, example_input=x
    ).eval()
    assert [f.shape[1] for f in features(x)] == features.feature_info.channels()
