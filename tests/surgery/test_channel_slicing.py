"""Channel slicing: splits, chunks and slices cut channel groups into segments; block handlers
rewrite the sizes a block stores; each built-in handler on its real timm block, function preserved."""

import math

import pytest
import timm
import torch
from torch import nn

import kapify
from kapify.surgery.channels import analyze_channels, register_block_handler
from kapify.surgery.channels.graph import GroupSet
from kapify.surgery.conv_types import is_conv
from kapify.surgery.rewiden import RewidenError
from tests.helpers import ROOT, assert_unchanged, state_snapshot


def _widen(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Re-widen in float64 and check the widened model computes what the original does."""
    model, x = model.double().eval(), x.double()
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)
    return wide


def _square_share(model: nn.Module) -> float:
    convs = [m for m in model.modules() if is_conv(m)]
    return sum(math.isqrt(c.out_channels) ** 2 == c.out_channels for c in convs) / len(convs)


def _mini_res2net() -> nn.Module:
    from timm.models.res2net import Bottle2neck
    from timm.models.resnet import ResNet

    return ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], base_width=26, block_args=dict(scale=4), num_classes=10)


# (model, block class name, the attribute its handler rewrites, least share of square convs after re-widening)
BLOCKS = [
    (lambda: timm.create_model("cs3darknet_s", num_classes=10), "CrossStage3", "expand_chs", 0.85),
    (lambda: timm.create_model("cspresnet50", num_classes=10), "CrossStage", "expand_chs", 1.0),
    (_mini_res2net, "Bottle2neck", "width", 1.0),
    (lambda: timm.create_model("ghostnet_050", num_classes=10), "GhostModule", "out_chs", 0.6),
    (lambda: timm.create_model("rexnet_100", num_classes=10), "LinearBottleneck", "in_channels", 1.0),
    (lambda: timm.create_model("dpn48b", num_classes=10), "DualPathBlock", "num_1x1_c", 0.95),
    (lambda: timm.create_model("skresnet18", num_classes=10), "SelectiveKernel", "in_channels", 0.75),
    (lambda: timm.create_model("mixnet_s", num_classes=10), "MixedConv2d", "splits", 0.8),
    (lambda: timm.create_model("fasternet_t0", num_classes=10), "Partial_conv3", "dim_conv3", 1.0),
    (lambda: timm.create_model("inception_next_atto", num_classes=10), "InceptionDWConv2d", "split_indexes", 1.0),
    (
        lambda: timm.create_model("coatnet_pico_rw_224", img_size=64, num_classes=10),
        "Attention2d",
        "num_heads",
        0.75,
    ),  # 2x growth cap: convert gives the rest spare filters
    (lambda: timm.create_model("test_mambaout", num_classes=10), "GatedConvBlock", "split_indices", 0.8),
]


@pytest.mark.parametrize("build,block,attr,least_square", BLOCKS, ids=[b[1] for b in BLOCKS])
def test_block_handler_rewrites_stored_sizes_and_keeps_the_function(build, block, attr, least_square):
    model = build()
    x = torch.rand(1, 3, 64, 64)
    before = {n: getattr(m, attr) for n, m in model.named_modules() if type(m).__name__ == block}
    assert before, f"no {block} in the model"
    graph = analyze_channels(model, x)
    assert any(site.owner in before for site in graph.slices)
    assert not any(
        "cuts the channels" in (g.fixed or "") or "is not channel-aware" in (g.fixed or "") for g in graph.groups
    )
    wide = _widen(model, x)
    after = {n: getattr(m, attr) for n, m in wide.named_modules() if n in before}
    assert any(after[n] != before[n] for n in before), "no stored size was rewritten"
    assert _square_share(wide) >= least_square


class Halves(nn.Module):
    """A block that splits its conv's output at a size it stores (the example in docs/rewiden.md)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv, self.half = nn.Conv2d(3, width, 3, padding=1), width // 2
        self.left, self.right = nn.Conv2d(self.half, 5, 1), nn.Conv2d(width - self.half, 5, 1)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        a, b = self.conv(x).split(self.half, dim=1)
        return self.head(torch.cat([self.left(a), self.right(b)], 1))


@pytest.fixture
def halves_handler(scoped_registries):

    @register_block_handler(Halves)
    def halves(block, sizes):
        """x.split(self.half, 1)"""
        block.half = sizes(block.half)


def test_a_split_at_a_stored_size_without_a_handler_fixes_the_group_and_names_the_block():
    graph = analyze_channels(Halves(), torch.rand(1, 3, 6, 6))
    group = graph.group_of("conv")
    assert group is not None and "'Halves'" in group.fixed and "register_block_handler" in group.fixed
    wide = _widen(Halves(), torch.rand(1, 3, 6, 6))
    assert wide.conv.out_channels == 8 and wide.half == 4


def test_a_user_block_handler_widens_the_split_and_rewrites_its_size(halves_handler):
    model, x = Halves(width=18), torch.rand(1, 3, 6, 6)
    graph = analyze_channels(model, x)
    assert len(graph.outputs["conv"]) == 2 and graph.slices[0].owner == ""
    wide = _widen(model, x)
    assert math.isqrt(wide.conv.out_channels) ** 2 == wide.conv.out_channels  # the split conv's whole output is square
    assert wide.half >= wide.conv.out_channels - wide.half >= 9  # split(half): the last piece is no wider
    for conv in (wide.left, wide.right):
        assert math.isqrt(conv.out_channels) ** 2 == conv.out_channels


def test_register_block_handler_wants_module_classes():
    with pytest.raises(TypeError, match="nn.Module classes"):
        register_block_handler(Halves())
    with pytest.raises(TypeError, match="nn.Module classes"):
        register_block_handler()


def test_a_failing_block_handler_leaves_the_model_untouched(scoped_registries):

    @register_block_handler(Halves)
    def broken(block, sizes):
        block.half = sizes(block.half + 1)  # no split there: KeyError

    model = Halves(width=18)
    snapshot = state_snapshot(model)
    with pytest.raises(RewidenError, match="block handler of '' \\(Halves\\)"):
        kapify.rewiden(model, "square", example_input=torch.rand(1, 3, 6, 6))
    assert_unchanged(model, snapshot)
    with pytest.warns(UserWarning, match="falls back"):
        kap = kapify.convert(model, example_input=torch.rand(1, 3, 6, 6))
    assert kap.conv.kap_pool.keep == 18 and kap.conv.out_channels == 25  # width kept: a 5x5 sheet with spare filters
    assert_unchanged(model, snapshot)


class Chunks(nn.Module):
    """``chunk(n)`` stores no size: its pieces only keep one width."""

    def __init__(self, to_output: bool = False) -> None:
        super().__init__()
        self.to_output = to_output
        self.conv, self.a, self.b = nn.Conv2d(3, 12, 1), nn.Conv2d(4, 7, 1), nn.Conv2d(4, 7, 1)
        self.head = nn.Conv2d(18, 3, 1)

    def forward(self, x):
        p, q, r = self.conv(x).chunk(3, dim=1)
        out = self.head(torch.cat([self.a(p), self.b(q), r], 1))
        return (out, r) if self.to_output else out


def test_chunk_pieces_widen_together_and_a_piece_that_stays_holds_them_all():
    x = torch.rand(1, 3, 5, 5)
    graph = analyze_channels(Chunks(), x)
    assert len(graph.outputs["conv"]) == 3 and graph.ties
    wide = _widen(Chunks(), x)
    assert (
        wide.conv.out_channels % 3 == 0
        and wide.conv.out_channels > 12
        and wide.head.in_channels == 2 * 9 + wide.conv.out_channels // 3
    )
    model = Chunks(to_output=True).double().eval()  # r is a model output: no piece may widen
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x.double())
    assert wide.conv.out_channels == 12
    assert wide.a.out_channels == 9  # the other convs still widen


class SliceAdd(nn.Module):
    """A partial residual ``x[:, :k] + shortcut`` (RexNet) and the rest taken with ``narrow``."""

    def __init__(self) -> None:
        super().__init__()
        self.k, self.rest = 10, 4
        self.stem, self.expand, self.head = nn.Conv2d(3, 10, 1), nn.Conv2d(10, 14, 1), nn.Conv2d(14, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        y = self.expand(s)
        return self.head(torch.cat([y[:, : self.k] + s, y.narrow(1, self.k, self.rest)], 1))


def test_a_slice_and_narrow_follow_the_channels_and_square_the_sliced_conv(scoped_registries):

    @register_block_handler(SliceAdd)
    def slice_add(block, sizes):
        block.k, block.rest = sizes(block.k), sizes(block.k + block.rest) - sizes(block.k)

    x = torch.rand(1, 3, 4, 4)
    graph = analyze_channels(SliceAdd(), x)
    assert len(graph.outputs["expand"]) == 2 and graph.outputs["expand"][0] == graph.outputs["stem"][0]
    wide = _widen(SliceAdd(), x)
    assert (wide.stem.out_channels, wide.expand.out_channels, wide.k, wide.rest) == (16, 25, 16, 9)


def test_groupset_cut_and_align_refine_every_use_of_a_group():
    groups = GroupSet()
    a, b = groups.new(12), groups.new(12)
    groups.cut((a,), 5)
    assert [groups.width[g] for g in groups.leaves(a)] == [5, 7]
    left, right = groups.align([(a,), (b,)])
    assert [groups.width[g] for g in right] == [5, 7]
    for x, y in zip(left, right):
        groups.union(x, y)
    assert groups.expand((a,)) == groups.expand((b,))
    c = groups.new(6)
    doubled = (c, c)  # GhostNet: a group and its depthwise copy side by side
    groups.cut(doubled, 9)  # cuts c at 3: both copies see it
    assert [groups.width[g] for g in groups.expand(doubled)] == [3, 3, 3, 3]
    groups.fix(c, "model output")
    assert groups.is_fixed(c) and all(groups.is_fixed(g) for g in groups.leaves(c))


def test_the_docs_block_handler_example_runs(scoped_registries, capsys):
    import re

    page = (ROOT / "docs" / "rewiden.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "register_block_handler" in b)
    exec(compile(example, "docs/rewiden.md", "exec"), {"__name__": "docs_example"})
    assert capsys.readouterr().out.split() == ["25", "16"]


class DepthMultiplier(nn.Module):
    """A depthwise conv with a depth multiplier of 2 (out = 2 x in), as in PiT, FastViT and SENet154's grouped convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.dw = nn.Conv2d(12, 24, 3, padding=1, groups=12)
        self.grouped = nn.Conv2d(24, 48, 3, padding=1, groups=4)  # 6 -> 12 channels per group
        self.head = nn.Conv2d(48, 2, 1)

    def forward(self, x):
        return self.head(self.grouped(self.dw(self.stem(x)))).mean((2, 3))


def test_a_depth_multiplier_widens_by_whole_groups_and_keeps_its_ratio():
    model, x = DepthMultiplier(), torch.rand(1, 3, 6, 6)
    graph = analyze_channels(model, x)
    dw = graph.outputs["dw"][0]
    assert graph.multiplied[dw] == (graph.outputs["stem"][0], 1, 2)
    wide = _widen(model, x)
    # the stem's width must be a square that makes dw's output (2x) a whole number of grouped's groups of 6: 36
    assert (wide.stem.out_channels, wide.dw.groups, wide.dw.out_channels) == (36, 36, 72)
    assert (wide.grouped.in_channels, wide.grouped.groups, wide.grouped.out_channels) == (72, 12, 144)
    kap = kapify.convert(model, example_input=x.double())  # _widen made the model float64
    why = kapify.get_config(kap).fixed_widths
    assert "widens with its input in whole groups or heads" in why["dw"]


def test_a_converted_model_with_rewritten_split_sizes_saves_and_loads(tmp_path):
    model, x = timm.create_model("cs3darknet_s", num_classes=10).eval(), torch.rand(2, 3, 64, 64)
    kap = kapify.convert(model, example_input=x[:1]).eval()
    kapify.save(kap, tmp_path / "cs3.safetensors")
    loaded = kapify.load(tmp_path / "cs3.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), kap(x))
    assert (
        [b.expand_chs for b in loaded.stages]
        == [b.expand_chs for b in kap.stages]
        != [b.expand_chs for b in model.stages]
    )


def test_metaformer_scale_pow_and_repeat_are_followed():
    model, x = timm.create_model("convformer_s18", num_classes=10), torch.rand(1, 3, 64, 64)
    before = {n: m.shape for n, m in model.named_modules() if type(m).__name__ == "Scale"}
    kap = kapify.convert(model, example_input=x)  # StarReLU's ** 2, Scale's view(self.shape)
    assert not kapify.get_config(kap).fixed_widths
    after = {n: m.shape for n, m in kap.named_modules() if n in before}
    assert any(after[n] != before[n] for n in before)
