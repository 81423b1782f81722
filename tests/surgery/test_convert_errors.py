"""Bad input gets a clear, specific error and leaves the caller's model untouched."""

import warnings

import pytest
import timm
import torch
from torch import nn

import kapify
from tests.helpers import assert_unchanged, state_snapshot


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = DataDependent()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)))


@pytest.fixture
def model():
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(k=2), ValueError, "odd"),
        (dict(k=0), ValueError, "odd"),
        (dict(k=-3), ValueError, "odd"),
        (dict(sigma=-0.1), ValueError, "sigma"),
        (dict(pool="median"), ValueError, "'avg' \\(KAP\\), 'max' \\(KMP\\) or None"),
        (dict(grid="hex"), ValueError, "grid must be one of"),
        (dict(stride=2, pool=None), ValueError, "pooling stride"),
        (dict(stride=0), ValueError, "positive integer"),
        (dict(include="nothing*"), ValueError, "leave none of the"),
        (dict(exclude=3), ValueError, "patterns"),
    ],
)
def test_bad_options(model, kwargs, error, match):
    snap = state_snapshot(model)
    with pytest.raises(error, match=match):
        kapify.convert(model, **kwargs)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "call",
    [kapify.convert, kapify.rewiden, kapify.channel_groups, kapify.fold, kapify.summary, kapify.get_config,
     lambda m: kapify.save(m, "never-written.safetensors"), lambda m: kapify.arrange_channels(m)],
    ids=["convert", "rewiden", "channel_groups", "fold", "summary", "get_config", "save", "arrange_channels"],
)  # fmt: skip
def test_a_model_name_instead_of_a_model_says_how_to_build_it(call, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=r"expected a torch.nn.Module, got str: build the model first.*create_model"):
        call("resnet18")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("channels", [0, -3, 2.5])
def test_square_width_refuses_a_channel_count_that_is_not_a_positive_whole_number(channels):
    with pytest.raises(ValueError, match="positive whole number of channels"):
        kapify.square_width(channels)


def test_no_convolution():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="has no convolution.*register_conv_type"):
        kapify.convert(mlp)


def test_already_converted(model):
    kap = kapify.convert(model)
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match="already converted"):
        kapify.convert(kap)
    assert_unchanged(model, snap)


def test_untraceable_names_the_module_and_the_fix():
    net = Untraceable()
    snap = state_snapshot(net)
    with pytest.raises(
        kapify.TracingError, match=r"inside module 'gate' \(DataDependent\).*register_leaf_module\(DataDependent\)"
    ):
        kapify.convert(net, example_input=torch.randn(1, 3, 8, 8))
    assert_unchanged(net, snap)
    kap = kapify.convert(net, leaf_modules=[DataDependent], example_input=torch.randn(1, 3, 8, 8))
    assert [r.name for r in kapify.get_config(kap).layers] == ["conv", "head"]


def test_convs_inside_leaves_are_converted():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Conv2d(8, 9, 1)

        def forward(self, x):
            return self.inner(x) if x.mean() > -100 else x

    kapify.register_leaf_module(Block)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), Block())
    kap = kapify.convert(net, example_input=torch.randn(1, 3, 8, 8))
    routes = {r.name: r.route for r in kapify.get_config(kap).layers}
    assert routes == {"0": "graph", "1.inner": "inside leaf Block"}
    assert kap[1].inner.kap_pool.grid == kapify.ChannelGrid(3, 3)


def test_untrusted_graph_falls_back_to_every_conv(monkeypatch):
    import kapify.surgery.conv_sites as sites

    monkeypatch.setattr(sites, "check_graph", lambda *a, **k: "the traced graph fails at run time: boom")
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.warns(UserWarning, match="boom.*module walk"):
        kap = kapify.convert(net, example_input=torch.randn(1, 3, 8, 8))
    assert len(kapify.get_config(kap).layers) == 2


def test_functional_conv_is_reported():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))

        def forward(self, x):
            return torch.nn.functional.conv2d(self.conv(x), self.w)

    with pytest.warns(UserWarning, match="functional convolution"):
        kap = kapify.convert(Functional(), example_input=torch.randn(1, 3, 8, 8))
    assert len(kapify.get_config(kap).skipped) == 1
    assert "functional" in str(kapify.summary(kap))


def test_k_larger_than_the_grid_warns_and_names_the_layer():
    model = kapify.models.SmallConvNet(depth=2, width=[64, 9], num_classes=4)
    with pytest.warns(
        UserWarning, match=r"k=5 is larger than the channel grid of 1 conv\(s\), e.g. features.1.0 \(3x3\)"
    ):
        kapify.convert(model, k=5, grid="rect")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kapify.convert(model, k=3, grid="rect")
