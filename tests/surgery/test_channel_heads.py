"""Attention heads: widening a stream that attention reads adds whole heads (the head dim stays), the
stored head counts are rewritten by the attention block handler, q/k/v splits, merges back to the
stream (``reshape(B, N, C)`` sized off the input), RoPE, talking heads, channel attention, layer
weights read by ``F.linear`` and torchvision's Swin are followed. Real timm/torchvision blocks, float64.

Their LayerNorms are swapped for identities: a norm over the channels keeps a group's width under
``function_preserving`` (new channels would enter its statistics), and these tests need the stream
itself widened, to check that everything coupled to it follows exactly.
"""

import math

import pytest
import timm
import torch
import torchvision
from torch import nn

import kapify
from kapify.surgery.conv_types import is_conv
from tests.helpers import without_layernorm


def _heads(model: nn.Module) -> dict:
    heads = {
        n: next((getattr(m, a) for a in ("num_heads", "n_heads", "groups") if hasattr(m, a)), None)
        for n, m in model.named_modules()
        if "Attention" in type(m).__name__ or type(m).__name__.endswith("Attn") or type(m).__name__ in ("GPSA", "MHSA")
    }
    return {n: h for n, h in heads.items() if isinstance(h, int)}


def _tv_swin(v2: bool) -> nn.Module:
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4], num_classes=10, **extra
    )


MODELS = {  # name -> (builder, input side)
    "vit (Attention)": (
        lambda: timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10
        ),
        32,
    ),
    "vit attention pool": (
        lambda: timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10, global_pool="map"
        ),
        32,
    ),
    "cait (talking heads, class attention)": (
        lambda: timm.models.cait.Cait(
            img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, depth_token_only=1, num_classes=10
        ),
        32,
    ),
    "pvt_v2 (one head, kv of a pooled stream)": (
        lambda: timm.models.pvt_v2.PyramidVisionTransformerV2(
            depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=(2, 2), num_classes=10
        ),
        32,
    ),
    "eva (RoPE, F.linear with a q/v bias)": (
        lambda: timm.models.eva.Eva(
            img_size=32,
            patch_size=8,
            embed_dim=48,
            depth=1,
            num_heads=3,
            qkv_bias=True,
            use_rot_pos_emb=True,
            num_classes=10,
        ),
        32,
    ),
    "davit (window and channel attention)": (
        lambda: timm.models.davit.DaVit(
            depths=(1, 1), embed_dims=(24, 48), num_heads=(2, 4), window_size=4, num_classes=10
        ),
        32,
    ),
    "torchvision maxvit (einsum, n_heads)": (
        lambda: torchvision.models.maxvit.MaxVit(
            input_size=(32, 32),
            stem_channels=8,
            partition_size=2,
            block_channels=[16, 32],
            block_layers=[1, 1],
            head_dim=8,
            stochastic_depth_prob=0.0,
            num_classes=10,
        ),
        32,
    ),
    "torchvision swin": (lambda: _tv_swin(False), 32),
    "torchvision swin v2": (lambda: _tv_swin(True), 32),
    "xcit (cross-covariance attention, Fourier position encoding)": (
        lambda: timm.models.xcit.Xcit(
            img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, cls_attn_layers=1, num_classes=10
        ),
        32,
    ),
    "twins (windowed attention FX keeps whole)": (
        lambda: timm.models.twins.Twins(
            img_size=32,
            patch_size=4,
            embed_dims=(16, 32),
            num_heads=(2, 4),
            mlp_ratios=(2, 2),
            depths=(2, 2),
            wss=(2, 2),
            sr_ratios=(2, 1),
            num_classes=10,
        ),
        32,
    ),
    "convit (gated positional attention FX keeps whole)": (
        lambda: timm.models.convit.ConVit(
            img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=3, local_up_to_layer=1, num_classes=10
        ),
        32,
    ),  # 3 x 16 wide
    "fastvit attention (heads of a stored head_dim, NCHW)": (
        lambda: nn.Sequential(nn.Conv2d(3, 48, 1), timm.models.fastvit.Attention(48, head_dim=16), nn.Conv2d(48, 4, 1)),
        8,
    ),
    "torchvision vit (nn.MultiheadAttention)": (
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96, num_classes=10
        ),
        32,
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_widening_adds_whole_heads_and_keeps_the_function(name):
    build, side = MODELS[name]
    torch.manual_seed(0)
    model = without_layernorm(build()).double().eval()
    x = torch.rand(2, 3, side, side, dtype=torch.float64)
    before = _heads(model)
    assert before, "no attention block found"
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)
    after = _heads(wide)
    assert any(after[n] > before[n] for n in before), f"no head count grew: {before} -> {after}"
    convs = [m for m in wide.modules() if is_conv(m)]
    assert convs and all(math.isqrt(c.out_channels) ** 2 == c.out_channels for c in convs)


def test_convert_widens_normalised_attention_streams_to_squares():
    """With LayerNorm (timm's and torchvision's defaults) ``convert`` still widens the stream, heads and all."""
    for model in (timm.create_model("pvt_v2_b0", num_classes=10), torchvision.models.swin_t(num_classes=10)):
        kap = kapify.convert(model.eval(), k=3, sigma=0.1, example_input=torch.rand(1, 3, 224, 224))
        cfg = kapify.get_config(kap)
        assert all(math.isqrt(r.out_channels) ** 2 == r.out_channels for r in cfg.layers), cfg.fixed_widths
        with torch.no_grad():
            assert kap.eval()(torch.rand(1, 3, 224, 224)).shape == (1, 10)


def test_split_by_a_count_that_is_not_heads_is_not_widened_by_heads():
    """SKNet's ``view(B, self.num_paths, C // self.num_paths, H, W)`` in a block with a handler that is
    not an attention block: the paths stay two, the channels per path widen."""
    model = timm.create_model("skresnet18", num_classes=10).double().eval()
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    assert {m.num_paths for m in wide.modules() if type(m).__name__ == "SelectiveKernel"} == {2}
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)


def test_one_head_over_conv_features_widens_v_and_treats_q_k_like_a_norm():
    """iFormer's SHMA: q, k, v are convs, their channels on SDPA's feature dim. v's channels pass to the
    output; q.k is scaled by 1/sqrt(their count), so function_preserving keeps q and k (as it keeps a
    LayerNorm'd group) and convert widens them."""
    SHMA = pytest.importorskip(
        "timm.models.iformer", reason="iFormer first shipped after the lowest timm kapify supports"
    ).SHMA

    model = nn.Sequential(nn.Conv2d(3, 20, 1), SHMA(20), nn.Conv2d(20, 6, 1)).double().eval()
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-9, atol=1e-9)
    shma = wide[1]
    assert shma.q.c.out_channels == shma.k.c.out_channels == 10  # q, k: their width scales the attention
    assert (
        shma.v_gate.c.out_channels > 40 and shma.proj.c.in_channels == shma.v_gate.c.out_channels // 2
    )  # v (and its gate)
    config = kapify.get_config(kapify.convert(model.float(), example_input=x.float()))
    assert config.fixed_widths == {"2": "model output"}  # the logits conv keeps its width; q and k widen to 16
    assert all(math.isqrt(r.out_channels) ** 2 == r.out_channels for r in config.layers if r.name != "2")


def test_multihead_attention_widens_by_heads_with_packed_projections():
    """``nn.MultiheadAttention`` (sequence-first, learned key/value biases): its q, k, v rows of
    ``in_proj_weight`` follow the channel index, new heads see the old channels unchanged, whatever the new
    input channels hold (their weights are zero); a width that is not whole heads is refused."""
    from kapify.surgery.handlers import resize_layer

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True).double().eval()
    x = torch.rand(5, 3, 8, dtype=torch.float64)  # (tokens, batch, channels)
    with torch.no_grad():
        want = mha(x, x, x)[0]
    index = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])  # the two old heads swap places
    resize_layer(mha, new_out=12, out_index=index, zero_new_inputs=True)
    assert (mha.embed_dim, mha.num_heads, mha.head_dim, tuple(mha.in_proj_weight.shape)) == (12, 3, 4, (36, 12))
    wide = torch.rand(5, 3, 12, dtype=torch.float64)
    wide[..., index] = x
    with torch.no_grad():
        torch.testing.assert_close(mha(wide, wide, wide)[0][..., index], want)
    with pytest.raises(ValueError, match="whole heads"):
        resize_layer(mha, new_out=14, out_index=torch.arange(12))


def test_cross_attention_with_another_width_keeps_its_channels():
    """Keys and values from a stream of another width: the layer's channels cannot follow, they stay."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv, self.attn = (
                nn.Linear(4, 8),
                nn.Linear(4, 6),
                nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True),
            )

        def forward(self, x):
            return self.attn(self.q(x), self.kv(x), self.kv(x))[0].sum(1)

    from kapify.surgery.channels import analyze_channels

    graph = analyze_channels(Cross().eval(), torch.rand(2, 5, 4))
    assert graph.group_of("q").fixed and graph.group_of("kv").fixed


def test_a_position_embedding_unsqueezed_to_the_batch_widens_with_the_stream():
    """CLIP ResNets' attention pool: ``resample_abs_pos_embed(self.pos_embed.unsqueeze(0), ...) + x``."""
    model = nn.Sequential(
        nn.Conv2d(3, 12, 1), timm.layers.AttentionPool2d(12, feat_size=4, num_heads=2, out_features=10)
    )
    model = model.double().eval()
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    assert wide[0].out_channels == 16 and wide[1].pos_embed.shape == (17, 16)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x))


def test_reshape_as_follows_the_channels():
    """LeViT's LinearNorm: ``self.bn(x.flatten(0, 1)).reshape_as(x)`` after its linear."""
    from timm.models.levit import LinearNorm

    model = nn.Sequential(LinearNorm(6, 20), nn.GELU(), nn.Linear(20, 3)).double().eval()
    x = torch.rand(2, 5, 6, dtype=torch.float64)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=x).eval()
    assert wide[0].linear.out_features == wide[0].bn.num_features == 25
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x))
