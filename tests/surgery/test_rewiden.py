"""Re-widening: channel groups, function-preserving widening on the coverage list, square grids,
the kernel-size multiplier, width rules, bad input."""

import math
import warnings

import pytest
import timm
import torch
from torch import nn

import kapify
from kapify.surgery.handlers import resize_layer
from kapify.surgery.rewiden import RewidenError
from tests.helpers import ZOO, assert_unchanged, build, state_snapshot, without_layernorm

# where channel groups legitimately stay fixed (rectangular grids), and the reason the report gives
PARTLY_FIXED = {
    ("torchvision", "shufflenet_v2_x1_0"): "flattened",  # channel shuffle interleaves two groups' channels
}


def _param_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("library,name", ZOO)
def test_square_widening_preserves_the_function_and_gives_square_grids(library, name, tmp_path):
    model = build(library, name).eval()
    x = torch.rand(2, 3, 64, 64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x[:1]).eval()
    with torch.no_grad():
        want, got = model(x), wide(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))
    kap = kapify.convert(model, grid="square", example_input=x[:1])
    config = kapify.get_config(kap)
    square = [r for r in config.layers if math.isqrt(r.pooled_channels) ** 2 == r.pooled_channels]
    assert len(square) + len(config.fixed_widths) == len(config.layers)
    if (library, name) not in PARTLY_FIXED:
        assert len(square) >= 0.9 * len(config.layers), config.fixed_widths
    else:
        assert any(PARTLY_FIXED[(library, name)] in why for why in config.fixed_widths.values())
    for r in config.layers:  # a square width, or a fixed width on a square sheet with spare filters (not grouped convs)
        rows, cols = map(int, r.grid.split("x"))
        assert (rows == cols) == (r in square or r.out_channels > r.pooled_channels)
        assert rows == cols or kap.get_submodule(r.name).groups > 1
    out = kap.train()(x)
    out.sum().backward()
    assert out.shape == want.shape and torch.isfinite(out).all()
    report = kapify.summary(kap)
    assert report.params_before == _param_count(model) and report.params_after == _param_count(kap)


def test_timm_head_api_follows_the_new_width():
    wide = kapify.convert(timm.create_model("resnet18", num_classes=10), example_input=torch.rand(1, 3, 32, 32))
    assert wide.num_features == 576
    wide.reset_classifier(5)
    assert wide.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_residual_groups_of_resnet18():
    groups = kapify.channel_groups(timm.create_model("resnet18"), torch.rand(1, 3, 64, 64))
    stage1 = next(g for g in groups if "layer1.0.conv2" in g.producers)
    assert set(stage1.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}  # stem + residual adds
    assert "layer2.0.downsample.0" in stage1.consumers and "bn1" in stage1.channelwise and stage1.fixed is None
    head = next(g for g in groups if "fc" in g.producers)
    assert head.fixed == "model output" and head.width == 1000


def test_width_mult_and_checkpoint_round_trip(tmp_path):
    model = kapify.create_model("resnet18", num_classes=10)
    wide = kapify.models.adapt(model, "rewiden", rule={"name": "mult", "m": 2})
    assert wide.layer1[0].conv1.out_channels == 128 and wide.fc.in_features == 1024 and wide.fc.out_features == 10
    kap = kapify.convert(wide, grid="square", sigma=0.0, example_input=torch.rand(1, 3, 32, 32)).eval()
    kapify.save(kap, tmp_path / "w.safetensors")
    back = kapify.load(tmp_path / "w.safetensors").eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(back(x), kap(x))
    assert back.layer4[0].conv1.out_channels == 1024  # 2 x 512 = 1024 = 32^2 is already square


def test_resize_layer_places_old_channels_and_zeroes_new_inputs():
    conv = nn.Conv2d(4, 6, 3)
    old = conv.weight.detach().clone()
    out_index, in_index = torch.tensor([0, 2, 4, 6, 8, 10]), torch.tensor([1, 2, 3, 5])
    resize_layer(conv, new_in=7, in_index=in_index, new_out=12, out_index=out_index, zero_new_inputs=True)
    assert conv.weight.shape == (12, 7, 3, 3) and conv.in_channels == 7 and conv.out_channels == 12
    torch.testing.assert_close(conv.weight[out_index][:, in_index], old)
    assert (conv.weight[:, [0, 4, 6]] == 0).all()  # outgoing weights of new input channels
    assert conv.weight[1].abs().sum() > 0  # a new filter: the layer's own init
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(5)
    resize_layer(bn, new_out=5, out_index=torch.tensor([0, 1, 2]))
    assert bn.running_mean.tolist() == [5, 5, 5, 0, 0] and bn.weight.tolist() == [1] * 5


def test_a_grouped_conv_widens_each_group_when_the_index_says_so():
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=3).double()
    x = torch.rand(1, 6, 5, 5, dtype=torch.float64)
    index = torch.tensor([0, 1, 4, 5, 8, 9])  # 3 groups of 2 -> 3 groups of 4, old channels first in each
    want = conv(x)
    resize_layer(conv, new_in=12, in_index=index, new_out=12, out_index=index, zero_new_inputs=True)
    assert conv.groups == 3 and conv.weight.shape == (12, 4, 3, 3)
    wide_x = torch.rand(1, 12, 5, 5, dtype=torch.float64)
    wide_x[:, index] = x
    torch.testing.assert_close(conv(wide_x)[:, index], want)
    with pytest.raises(ValueError, match="puts one group's channels in different groups"):
        resize_layer(conv, new_in=101, new_out=101)  # only 1 group of 101 keeps them: 25x the inputs per group


def test_regnet_group_widths_widen_each_group_to_square_grids():
    """RegNetX-6.4GF's first stage: 3 groups of 56 channels (with squeeze-excitation here). No square
    within 4x of 168 is a whole number of groups of 56 (the first is 784), so each group widens (3 x 75 = 225)."""
    from timm.models.regnet import Bottleneck

    model = (
        nn.Sequential(
            nn.Conv2d(3, 32, 3),
            Bottleneck(32, 168, group_size=56),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(168, 10),
        )
        .double()
        .eval()
    )
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)
    convs = {n: m for n, m in wide.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(math.isqrt(c.out_channels) ** 2 == c.out_channels for c in convs.values())
    old = dict(model.named_modules())
    assert any(c.groups == old[n].groups > 1 and c.out_channels > old[n].out_channels for n, c in convs.items())


def _bn_block(c_in, c_out, groups):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups), nn.BatchNorm2d(c_out), nn.ReLU()]


@pytest.mark.parametrize(
    "chain, want",
    [
        ([(64, 128, 64)], [(64, 144, 16)]),  # depthwise x2: 16 merged groups of 4 -> 9 (4 old groups each)
        ([(128, 256, 64)], [(144, 324, 36)]),  # SENet154's 64 groups of 2 -> 4: 36 groups of 4 -> 9
        (
            [(64, 128, 64), (128, 256, 128)],
            [(64, 144, 16), (144, 324, 36)],
        ),  # the second reads the first's spread channels
        ([(64, 256, 64)], [(64, 256, 64)]),  # depthwise x4 is square with whole groups: nothing merged
    ],
)
def test_grouped_convs_with_a_depth_multiplier_merge_groups_to_square_outputs(chain, want):
    layers = [nn.Conv2d(3, chain[0][0], 1)]
    for c_in, c_out, groups in chain:
        layers += _bn_block(c_in, c_out, groups)
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chain[-1][1], 10)).double().eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # trained-like statistics
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    grouped = [m for m in wide.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [(m.in_channels, m.out_channels, m.groups) for m in grouped] == want
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)


def test_merged_groups_read_only_their_old_inputs_and_keep_the_old_filters():
    conv = nn.Conv2d(4, 8, 3, groups=4)
    old = conv.weight.detach().clone()
    out_index = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])  # 2 merged groups of 2 old ones: 2 -> 5 outputs each
    resize_layer(conv, new_in=4, new_out=10, out_index=out_index, zero_new_inputs=True)
    assert conv.groups == 2 and conv.weight.shape == (10, 2, 3, 3)
    torch.testing.assert_close(conv.weight[out_index, torch.arange(4).repeat_interleave(2) % 2], old[:, 0])
    assert (
        conv.weight[out_index, (torch.arange(4).repeat_interleave(2) + 1) % 2] == 0
    ).all()  # the other old group's input
    assert conv.weight[[4, 9]].abs().sum() > 0  # new filters: the layer's own init


def test_maxxvit_convnext_block_merges_the_groups_of_its_stride_2_depthwise_conv():
    """MaxxViT-RMLP's first block of a stage: a stride-2 depthwise conv doubling the channels (64 -> 128), added
    to a 1x1 conv's shortcut (LayerNorm swapped for an identity so the stream widens with the function kept)."""
    block = timm.create_model("maxxvit_rmlp_nano_rw_256", pretrained=False).stages[1].blocks[0].conv
    block.norm = nn.Identity()
    model = (
        nn.Sequential(nn.Conv2d(3, 64, 1), block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
        .double()
        .eval()
    )
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    assert (wide[1].conv_dw.in_channels, wide[1].conv_dw.out_channels, wide[1].conv_dw.groups) == (64, 144, 16)
    assert wide[1].shortcut.expand.out_channels == 144
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)


def test_a_transposed_conv_keeps_its_filters_and_computes_the_same():
    model = nn.Sequential(
        nn.Conv2d(3, 5, 1), nn.ConvTranspose2d(5, 6, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1)
    ).eval()
    x = torch.rand(2, 3, 4, 4)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x)
    assert wide[1].weight.shape == (9, 9, 4, 4) and (wide[1].in_channels, wide[1].out_channels) == (9, 9)
    torch.testing.assert_close(wide[1].weight[:5, :6], model[1].weight)  # (in, out, kh, kw): old filters in place
    assert (wide[1].weight[5:] == 0).all()  # outgoing weights of the new input channels
    torch.testing.assert_close(wide.eval()(x), model(x))


def test_square_width_rule():
    assert [kapify.square_width(c) for c in (1, 9, 10, 63, 64, 72, 144, 145)] == [1, 9, 16, 64, 64, 144, 144, 256]
    assert kapify.square_width(65) == 81  # 144 (a multiple of 16) would be over MAX_GROWTH = 2x: any square
    assert kapify.square_width(128, divisor=3) == 144  # 144 = 12^2 is a multiple of 16 and of 3
    assert kapify.square_width(100, divisor=7) == 196  # no square multiple of 16 and 7 within 2x: one of 7 alone
    assert kapify.square_width(240, divisor=30) == 240  # GroupNorm's 30 groups of 8: 900 is over 2x; keeps its width
    assert kapify.square_width(100, divisor=97) == 194  # no square multiple of 97 within 2x: next multiple


@pytest.mark.parametrize("stride", [2, 3])
def test_kernel_size_multiplier_keeps_downstream_shapes_and_centres_old_filters(stride):
    model = kapify.models.SmallConvNet(depth=2, width=12, num_classes=5).eval()
    x = torch.rand(2, 3, 16, 16)
    kap = kapify.convert(
        model, k=1, stride=stride, sigma=0.0, grid="rect"
    )  # K=1: each output is exactly its centre filter
    assert kap.features[0][0].weight.shape[0] == 12 * stride * stride
    assert kap.features[1][0].in_channels == 12  # downstream unchanged
    torch.testing.assert_close(kap.eval()(x), model(x), rtol=1e-5, atol=1e-5)
    kap3 = kapify.convert(model, k=3, stride=stride, sigma=0.1, impl="activation", grid="rect")
    kap3w = kapify.convert(model, k=3, stride=stride, sigma=0.1, impl="weight", grid="rect")
    kap3w.load_state_dict(kap3.state_dict())
    torch.testing.assert_close(kap3.eval()(x), kap3w.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "rule,match",
    [
        (lambda c: c - 1, "shrinks"),
        (lambda c: c * 1.5, "must return an int"),
        ("hexagonal", "unknown width rule"),
    ],
)
def test_bad_width_rules_leave_the_model_untouched(rule, match):
    model = timm.create_model("resnet18", num_classes=10)
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match=match):
        kapify.rewiden(model, rule, example_input=torch.rand(1, 3, 32, 32))
    assert_unchanged(model, snap)


def test_unresolvable_coupling_names_the_nodes_in_strict_mode():
    class Flip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.b(torch.flip(self.a(x), dims=[1])).mean((2, 3))  # reverses the channel order

    model = Flip()
    with pytest.raises(ValueError, match=r"a: .*flip.* is not channel-aware"):
        kapify.rewiden(model, "square", strict=True, example_input=torch.rand(1, 3, 4, 4))
    wide = kapify.rewiden(model, "square", example_input=torch.rand(1, 3, 4, 4))  # non-strict: the group keeps 8
    assert wide.a.out_channels == 8


def test_a_channel_shuffle_into_a_conv_widens_both_halves_together():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
            return self.b(y).mean((2, 3))

    model, x = Shuffle().double().eval(), torch.rand(2, 3, 4, 4, dtype=torch.double)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x[:1]).eval()
    assert (wide.a.out_channels, wide.b.out_channels) == (
        16,
        8,
    )  # a's halves: one group of 4 -> 8, so 16 is square; b: output
    wide = kapify.rewiden(model, {"name": "mult", "m": 2}, function_preserving=True, example_input=x[:1]).eval()
    assert wide.a.out_channels == 16 and wide.b.in_channels == 16
    torch.testing.assert_close(wide(x), model(x), rtol=1e-10, atol=1e-10)


def test_a_hard_coded_width_falls_back_to_rect_with_a_warning():
    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1)
            self.b, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y, v = self.a(x), self.c(x)
            v = v.reshape(v.shape[0], y.shape[1], v.shape[2], -1)  # 4 x 4x4 -> y's width (read at run time) x 4x2
            return self.b(y).mean((2, 3)) + self.d(v).mean((2, 3))

    model = HardCoded()
    with pytest.raises(RewidenError, match="hard-codes a channel count"):
        kapify.rewiden(model, {"name": "mult", "m": 2}, example_input=torch.rand(1, 3, 4, 4))
    with pytest.warns(UserWarning, match="falls back to rectangular grids"):
        kap = kapify.convert(model, example_input=torch.rand(1, 3, 4, 4))
    assert (
        kap.a.kap_pool.keep == 8 and "re-widening failed" in kapify.get_config(kap).fixed_widths["a"]
    )  # on a 3x3 sheet


class ChannelsLastBlock(nn.Module):
    """A ConvNeXt-style block: depthwise conv, permute to channels-last, LayerNorm + Linear MLP, back,
    LayerScale, residual; then a channel-mixing mean (CBAM-style) and a stored-shape view."""

    def __init__(self, stored_view: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.gamma = nn.Parameter(torch.rand(8))
        self.head = nn.Linear(8, 3)
        self.stored_view = stored_view

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(torch.relu(self.fc1(self.norm(y)))).transpose(1, 3).transpose(2, 3)  # back to NCHW
        gamma = self.gamma.view(8, 1, 1) if self.stored_view else self.gamma.reshape(1, -1, 1, 1)
        x = x + y * gamma
        return self.head(x.mean((2, 3)))


def test_channel_axis_is_followed_through_permutes_layernorm_linear_and_layerscale():
    model = ChannelsLastBlock().eval()
    groups = kapify.channel_groups(model, torch.rand(1, 3, 5, 6))
    stream = next(g for g in groups if "stem" in g.producers)
    assert set(stream.producers) == {"stem", "fc2"} and stream.fixed is None and stream.normalised
    assert {"dw", "norm", "gamma"} <= set(stream.channelwise) and set(stream.consumers) == {"fc1", "head"}
    hidden = next(g for g in groups if "fc1" in g.producers)
    assert hidden.width == 12 and hidden.fixed is None and not hidden.normalised
    x = torch.rand(2, 3, 5, 6)
    kept = kapify.rewiden(model, "square", function_preserving=True, example_input=x[:1]).eval()
    assert kept.stem.out_channels == 8 and kept.fc1.out_features == 16  # LayerNorm'd stream kept, hidden widened
    torch.testing.assert_close(kept(x), model(x))
    wide = kapify.rewiden(model, "square", example_input=x[:1]).eval()  # every group: the stream too
    assert wide.stem.out_channels == wide.dw.groups == wide.norm.normalized_shape[0] == wide.head.in_features == 9
    assert wide.gamma.shape == (9,) and torch.equal(wide.gamma[:8], model.gamma)
    torch.testing.assert_close(wide.gamma[8:], model.gamma.mean().expand(1))  # new LayerScale entries: the mean
    assert wide(x).shape == (2, 3)


def test_a_stored_shape_view_fixes_the_group_instead_of_breaking_the_model():
    model = ChannelsLastBlock(stored_view=True)
    groups = kapify.channel_groups(model, torch.rand(1, 3, 5, 6))
    stream = next(g for g in groups if "stem" in g.producers)
    assert stream.fixed is not None and "hard-codes 8 channels" in stream.fixed
    wide = kapify.rewiden(model, "square", example_input=torch.rand(1, 3, 5, 6))
    assert wide.stem.out_channels == 8 and wide.fc1.out_features == 16 and wide(torch.rand(1, 3, 5, 6)).shape == (1, 3)


def test_linear_over_another_dim_and_channel_statistics():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.proj = nn.Conv2d(3, 6, 1), nn.Linear(4, 4)
            self.gate = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            y = self.conv(x)
            y = y * torch.sigmoid(self.gate(y.mean(1, keepdim=True)))  # spatial attention: statistics over channels
            return self.proj(y.flatten(2)).sum()  # (N, 6, 4): a Linear over the 4 positions

    groups = kapify.channel_groups(Tokens(), torch.rand(1, 3, 2, 2))
    conv = next(g for g in groups if "conv" in g.producers)
    assert conv.normalised and "reads dim" not in conv.fixed  # the Linear mixes positions: the channels pass through it
    assert not any("proj" in g.producers or "proj" in g.consumers for g in groups)


def test_a_token_mixing_linear_keeps_its_own_width_and_lets_the_channels_widen():
    class TokenMixer(nn.Module):  # MLP-Mixer / ViT rel-pos: a Linear over the 4 positions of (N, 6, 4) tokens
        def __init__(self):
            super().__init__()
            self.conv, self.mix, self.head = nn.Conv2d(3, 6, 1), nn.Linear(4, 5), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.mix(self.conv(x).flatten(2)).mean(2))

    model, x = TokenMixer().eval(), torch.rand(2, 3, 2, 2)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x)
    assert wide.mix.weight.shape == (5, 4) and wide.conv.out_channels == wide.head.in_features == 9
    torch.testing.assert_close(wide.eval()(x), model(x))


def test_a_vit_stream_widens_with_its_tokens_and_position_embedding():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, reg_tokens=2, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)  # cls/reg tokens are expanded and concatenated, pos_embed added, x[:, 0] pooled
    stream = next(g for g in kapify.channel_groups(model, x) if "patch_embed.proj" in g.producers)
    assert (
        stream.fixed is None
        and stream.normalised
        and {"cls_token", "reg_token", "pos_embed"} <= set(stream.channelwise)
    )
    kap = kapify.convert(model, example_input=x)
    assert kap.patch_embed.proj.out_channels == 256 and not kapify.get_config(kap).fixed_widths
    assert (
        kap.pos_embed.shape == (1, model.pos_embed.shape[1], 256)
        and kap.reg_token.shape == (1, 2, 256)
        and kap.cls_token.shape == (1, 1, 256)
    )
    attn = kap.blocks[0].attn  # its inner width (3 heads of 64) widens by whole heads to a square: 4 heads
    assert attn.qkv.weight.shape == (3 * 256, 256) and attn.num_heads == 4 and kap(x).shape == (2, 10)


@pytest.mark.parametrize(
    "index,axis,expected",
    [
        ((slice(None), 0), 2, 1),
        ((slice(None), 0), 1, None),
        ((Ellipsis, 0), 1, 1),
        ((slice(None), slice(1, None)), 2, 2),
        ((slice(None), None, slice(None)), 1, 2),
        (0, 1, 0),
        ((slice(None), slice(0, 5)), 1, None),
        ((slice(None), [0, 1]), 2, None),
    ],
)
def test_indexing_follows_the_channel_axis(index, axis, expected):
    from kapify.surgery.channels.axes import indexed_axis as _indexed_axis

    assert _indexed_axis(index, 3, axis) == expected


class ShiftedWindows(nn.Module):  # Swin: pad H and W of an NHWC map, roll it, and put the windows back
    def __init__(self, pad_channels: bool = False):
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(3, 8, 1), nn.Linear(10 if pad_channels else 8, 8), nn.Conv2d(8, 4, 1)
        self.pad = (1, 1) if pad_channels else (0, 0, 0, 1, 0, 1)

    def forward(self, x):
        y = torch.nn.functional.pad(self.conv(x).permute(0, 2, 3, 1), self.pad)
        y = self.fc(torch.roll(y, shifts=(1, 1), dims=(1, 2)))
        return self.out(y[:, :4, :4].permute(0, 3, 1, 2)).mean((2, 3))


def test_padding_and_rolling_pixels_keep_the_channels_free():
    x = torch.rand(2, 3, 4, 4)
    stream = next(g for g in kapify.channel_groups(ShiftedWindows(), x) if "conv" in g.producers)
    assert stream.fixed is None and "fc" in stream.consumers
    model = ShiftedWindows().eval()
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x)
    assert wide.conv.out_channels == wide.fc.in_features == 9
    torch.testing.assert_close(wide.eval()(x), model(x))
    padded = next(g for g in kapify.channel_groups(ShiftedWindows(pad_channels=True), x) if "conv" in g.producers)
    assert "pad" in padded.fixed


@pytest.mark.parametrize("norm", ["LayerNormAct2d", "RmsNorm2d", "SimpleNorm2d"])
def test_timm_norms_over_dim_1_widen_with_their_conv(norm):
    layer = getattr(timm.layers, norm)(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), layer, nn.Conv2d(8, 4, 1))
    kap = kapify.convert(model, example_input=torch.rand(1, 3, 4, 4))
    assert kap[0].out_channels == 9 and kap[1].normalized_shape == (9,) and kap[1].weight.shape == (9,)
    assert "0" in kapify.get_config(kap).widened_across_norm


def test_blur_pool_widens_with_a_blur_filter_per_new_channel():
    """timm's anti-aliased downsampling (ResNet-blur, TResNet): one fixed blur filter per channel."""
    model = nn.Sequential(nn.Conv2d(3, 12, 1), timm.layers.BlurPool2d(12), nn.Conv2d(12, 4, 1)).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    assert wide[1].channels == 16 and wide[1].filt.shape == (16, 1, 3, 3)
    torch.testing.assert_close(wide[1].filt, wide[1].filt[:1].expand(16, 1, 3, 3))  # the same blur for the new channels
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x))


def test_global_context_matmul_keeps_the_channels_on_its_rows():
    """GCNet: ``x.reshape(B, 1, C, HW) @ attn`` with attention logits from a 1-channel conv: row i is channel i."""
    model = nn.Sequential(nn.Conv2d(3, 12, 1), timm.layers.GlobalContext(12), nn.Conv2d(12, 5, 1)).double().eval()
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    assert wide[0].out_channels == 16 and wide[1].mlp_scale.fc1.in_channels == 16
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x))


def test_a_reshape_sized_off_a_channel_count_it_cannot_line_up_keeps_both_widths():
    """LambdaLayer: ``out.reshape(B, C, H, W)`` with C read off its input, but ``out`` is heads x dim_v
    flattened: the input may not widen (it did, and the widened model's forward broke)."""
    from timm.layers.lambda_layer import LambdaLayer

    model = nn.Sequential(nn.Conv2d(3, 20, 1), LambdaLayer(20, num_heads=4, dim_head=4, r=3), nn.Conv2d(20, 4, 1))
    model, x = model.double().eval(), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    assert "sizes its channels off" in next(g for g in kapify.channel_groups(model, x) if "0" in g.producers).fixed
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x))


@pytest.mark.parametrize(
    "norm,groups_attr",
    [
        (lambda groups: nn.GroupNorm(groups, 12), "num_groups"),
        (lambda groups: timm.layers.EvoNorm2dS0a(12, groups=groups), "groups"),  # RegNetZ-EvoS: no width attribute
    ],
)
def test_group_norms_widen_by_whole_groups_and_keep_the_function(norm, groups_attr):
    """3 groups of 4: new channels form new groups of 4, so the old groups keep their statistics and
    function_preserving widens the norm; one group normalises over all channels and keeps its width."""
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    for groups, width in ((3, 16), (1, 12)):
        model = nn.Sequential(nn.Conv2d(3, 12, 1), norm(groups), nn.ReLU(), nn.Conv2d(12, 5, 1)).double().eval()
        wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
        assert (wide[1].weight.shape[0], getattr(wide[1], groups_attr)) == (width, width // 4 if groups > 1 else 1)
        with torch.no_grad():
            torch.testing.assert_close(wide(x), model(x))


def test_a_leaf_block_with_a_layer_rule_widens_its_input():
    """VGG's ConvMlp: a leaf for FX (it pools a small input first); its rule says fc1 reads the input."""
    from timm.models.vgg import ConvMlp

    model = nn.Sequential(
        nn.Conv2d(3, 20, 3), ConvMlp(20, 36, kernel_size=2, mlp_ratio=1.0), nn.Flatten(), nn.Linear(36 * 9, 5)
    )
    model = model.double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    assert wide[0].out_channels == wide[1].fc1.in_channels == 25 and wide[1].fc2.out_channels == 36
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x))
    for bad in [(), ("ConvMlp",), (nn.Module(),)]:
        with pytest.raises(TypeError, match="nn.Module classes"):
            kapify.register_layer_rule(*bad)


def test_the_analysis_looks_inside_blocks_timm_keeps_whole():
    model = timm.create_model("nf_regnet_b0", num_classes=10)  # NormFreeBlock: a leaf for timm's FX (in-place ops)
    x = torch.rand(1, 3, 64, 64)
    block_conv = next(g for g in kapify.channel_groups(model, x) if "stages.0.0.conv1" in g.producers)
    assert block_conv.fixed is None
    kap = kapify.convert(model, example_input=x)
    config = kapify.get_config(kap)
    assert not config.fixed_widths and all(math.isqrt(r.out_channels) ** 2 == r.out_channels for r in config.layers)
    assert kap.eval()(x).shape == (1, 10)


class FlattenedClassifier(nn.Module):  # VGG / AlexNet: the classifier reads C x H x W flattened features
    def __init__(self, slice_features: bool = False):
        super().__init__()
        self.conv, self.drop, self.fc = nn.Conv2d(3, 8, 1), nn.Dropout(0.5), nn.Linear(10 if slice_features else 32, 5)
        self.slice_features = slice_features

    def forward(self, x):
        y = self.drop(torch.flatten(torch.relu(self.conv(x)), 1))
        return self.fc(y[:, :10] if self.slice_features else y)


def test_a_classifier_over_flattened_channels_widens_with_them():
    model, x = FlattenedClassifier().eval(), torch.rand(2, 3, 2, 2)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x)
    assert wide.conv.out_channels == 9 and wide.fc.in_features == 36
    torch.testing.assert_close(wide.eval()(x), model(x))
    torch.testing.assert_close(wide.fc.weight[:, :32], model.fc.weight)  # channel 8's four entries come last
    sliced = next(
        g for g in kapify.channel_groups(FlattenedClassifier(slice_features=True), x) if "conv" in g.producers
    )
    assert "flattened over 4 entries" in sliced.fixed


def test_a_conv_after_heads_merged_back_into_channels_produces_free_channels():
    class HeadsBack(nn.Module):  # CoAtNet / LeViT attention: (N, heads, dim, HW) viewed back to (N, C, H, W)
        def __init__(self):
            super().__init__()
            self.qkv, self.proj, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            n, _, h, w = x.shape
            heads = torch.relu(self.qkv(x).reshape(n, 2, 4, h * w))
            return self.out(self.proj(heads.reshape(n, 8, h, w))).mean((2, 3))

    model, x = HeadsBack().eval(), torch.rand(2, 3, 2, 2)
    assert next(g for g in kapify.channel_groups(model, x) if "proj" in g.producers).fixed is None
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x)
    assert wide.qkv.out_channels == 8 and wide.proj.out_channels == 9
    torch.testing.assert_close(wide.eval()(x), model(x))


def test_convert_squares_convnext_across_layernorm_and_says_so():
    model = timm.create_model("convnext_atto", num_classes=10)
    kap = kapify.convert(model, example_input=torch.rand(1, 3, 64, 64))
    config = kapify.get_config(kap)
    assert all(math.isqrt(r.out_channels) ** 2 == r.out_channels for r in config.layers) and not config.fixed_widths
    assert "stem.0" in config.widened_across_norm and "across a LayerNorm/GroupNorm" in str(kapify.summary(kap))
    block = kap.stages[0].blocks[0]
    assert block.gamma.shape[0] == block.conv_dw.out_channels == block.norm.normalized_shape[0] == 49
    assert kap.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 10)


def test_convert_keeps_normalised_widths_when_widening_them_breaks_the_model():
    class ReadsNormalisedWidth(nn.Module):  # like MaxViT's attention: reshapes to a LayerNorm'd width read at run time
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.c = nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8), nn.Conv2d(3, 4, 1)
            self.b, self.d, self.e, self.f = (
                nn.Conv2d(8, 4, 1),
                nn.Conv2d(8, 4, 1),
                nn.Conv2d(3, 20, 1),
                nn.Conv2d(20, 4, 1),
            )

        def forward(self, x):
            y, v = self.norm(self.a(x)), self.c(x)
            v = v.reshape(v.shape[0], y.shape[1], v.shape[2], -1)
            return self.b(y).mean((2, 3)) + self.d(v).mean((2, 3)) + self.f(self.e(x)).mean((2, 3))

    model = ReadsNormalisedWidth()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back to rect: only the normalised group keeps its width
        kap = kapify.convert(model, example_input=torch.rand(1, 3, 4, 4))
    config = kapify.get_config(kap)
    assert kap.a.kap_pool.keep == 8 and "normalises across these channels" in config.fixed_widths["a"]
    assert kap.e.out_channels == 25 and not config.widened_across_norm


def test_a_conv_sliding_along_the_channels_lets_them_widen():
    model = timm.create_model("ecaresnet26t", num_classes=10)  # ECA: Conv1d over the pooled channel sequence
    x = torch.rand(1, 3, 64, 64)
    stage1 = next(g for g in kapify.channel_groups(model, x) if "layer1.0.conv3" in g.producers)
    assert stage1.fixed is None and stage1.normalised and "layer1.0.se.conv" not in stage1.producers
    kap = kapify.convert(model, example_input=x)
    assert kap.layer1[0].conv3.out_channels == 256 and kap.layer2[0].conv3.out_channels == 576
    assert "layer2.0.conv3" in kapify.get_config(kap).widened_across_norm and kap.eval()(x).shape == (1, 10)


def test_tiny_vit_blocks_fx_keeps_whole_widen_their_stream_and_keep_the_attention_inside():
    """TinyViT's block is a leaf (it pads to whole windows): its layer rule says attention's ``qkv`` reads the stream
    and ``proj`` writes it (the per-head widths between stay), ``local_conv`` is depthwise and the MLP adds to it."""
    torch.manual_seed(0)
    model = timm.models.tiny_vit.TinyVit(
        embed_dims=(16, 40), depths=(1, 2), num_heads=(1, 2), window_sizes=(4, 4), num_classes=10
    )
    model = without_layernorm(model).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)
    block, old = wide.stages[1].blocks[1], model.stages[1].blocks[1]
    assert block.local_conv.conv.out_channels == block.attn.qkv.in_features == block.mlp.fc2.out_features == 49
    assert (
        block.attn.qkv.out_features == old.attn.qkv.out_features
        and block.attn.proj.in_features == old.attn.proj.in_features
    )
    assert all(math.isqrt(m.out_channels) ** 2 == m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d))


def test_shvit_partial_single_head_attention_widens_its_stored_sizes_together():
    """SHViT's SHSA splits the stream at ``self.pdim``, q, k, v at ``self.qk_dim`` and reshapes v to ``self.pdim``:
    the two places cut at one stored size keep one width, q and k (contracted) stay, v is sized so q, k, v is square."""
    torch.manual_seed(0)
    model = (
        timm.models.shvit.SHViT(
            embed_dim=(40, 56, 64),
            partial_dim=(12, 20, 24),
            qk_dim=(8, 8, 8),
            depth=(1, 1, 1),
            types=("i", "s", "s"),
            norm_layer=nn.Identity,
            num_classes=10,
        )
        .double()
        .eval()
    )
    for bn in (
        m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    ):  # proj's BN starts at 0: give it a function
        bn.weight.data.uniform_(0.5, 2)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)
    attn = next(m for m in wide.modules() if type(m).__name__ == "SHSA")
    assert (
        attn.qk_dim == 8
        and attn.qkv.c.out_channels == 2 * attn.qk_dim + attn.pdim
        and attn.dim == attn.proj[1].c.out_channels
    )
    assert all(math.isqrt(m.out_channels) ** 2 == m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d))


def test_mobilevit_v2_blocks_fx_keeps_whole_widen_their_transformer_and_stored_embed_dim():
    """MobileViT-v2's block is a leaf (it resizes to whole patches): its layer rule follows conv_kxk, conv_1x1, each
    linear attention (``qkv_proj`` split into 1 query channel and keys and values of ``embed_dim``, rewritten by the
    attention's block handler so that 1 + 2 x embed_dim is square), the MLP, norm and conv_proj."""
    torch.manual_seed(0)
    model = timm.create_model("mobilevitv2_050", num_classes=10)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.GroupNorm):  # over all channels: kept under function_preserving, so swapped out here
            model.set_submodule(name, nn.Identity())
    model = model.double().eval()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)
    attn = wide.stages[2][1].transformer[0].attn
    assert (
        attn.qkv_proj.out_channels == 1 + 2 * attn.embed_dim
        and attn.embed_dim > model.stages[2][1].transformer[0].attn.embed_dim
    )
    assert all(math.isqrt(m.out_channels) ** 2 == m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d))


def test_cond_conv_experts_widen_like_convs_and_keep_the_function():
    """timm's CondConv2d keeps each expert's filters flattened in one (experts, out x in x k x k) parameter; the
    routing weights it takes besides its input keep their width (8 experts, not a square 9)."""
    from timm.models._efficientnet_blocks import CondConvResidual

    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 20, 1),
            CondConvResidual(20, 20, exp_ratio=3.0, num_experts=8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(20, 5),
        )
        .double()
        .eval()
    )
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)
    pw, dw = wide[1].conv_pw, wide[1].conv_dw
    assert (pw.in_channels, pw.out_channels, dw.out_channels, dw.groups) == (25, 64, 64, 64)
    assert (
        pw.weight_shape == (64, 25, 1, 1) and pw.weight.shape == (8, 64 * 25) and wide[1].routing_fn.out_features == 8
    )


@pytest.mark.parametrize(
    "c_mid, c_out, groups", [(8, 8, 4), (8, 16, 8)]
)  # whole new groups; a depth multiplier (merged)
def test_a_grouped_transposed_conv_keeps_its_function(c_mid, c_out, groups):
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, c_mid, 1),
            nn.ConvTranspose2d(c_mid, c_out, 4, stride=2, padding=1, groups=groups),
            nn.ReLU(),
            nn.Conv2d(c_out, 2, 1),
        )
        .double()
        .eval()
    )
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    assert math.isqrt(wide[1].out_channels) ** 2 == wide[1].out_channels > c_out
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)


def test_a_user_layer_with_a_registered_channelwise_handler_widens_with_its_group(scoped_registries):
    class Scale(nn.Module):  # one learned factor per channel, its width in ``dim``
        def __init__(self, dim):
            super().__init__()
            self.dim, self.weight = dim, nn.Parameter(torch.rand(dim))

        def reset_parameters(self):
            nn.init.ones_(self.weight)

        def forward(self, x):
            return x * self.weight[:, None, None]

    with pytest.raises(TypeError, match="takes a ChannelHandler instance"):
        kapify.register_channel_handler(Scale, "channelwise")
    kapify.register_channel_handler(Scale, kapify.ChannelwiseHandler("dim"))
    model = nn.Sequential(nn.Conv2d(3, 10, 3), Scale(10), nn.Conv2d(10, 4, 1)).double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    assert wide[1].dim == wide[1].weight.shape[0] == wide[0].out_channels == 16
    torch.testing.assert_close(wide(x), model(x))
