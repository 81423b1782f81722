"""Block handlers for timm and torchvision blocks that split their channels at stored sizes, and
rules for blocks FX keeps whole.

Each handler rewrites the attributes its block's forward reads the split sizes from; the reason
for each is its docstring. Tested on the real blocks with function preservation
(``tests/test_channel_slicing.py``).
"""

from __future__ import annotations

from torch import nn

from ..optional import register_present
from .blocks import StoredSizes, register_block_handler
from .module_rules import add_to_stream, attention_leaf, layers_in_sequence, register_layer_rule, split_in_leaf

__all__: list = []


@register_present(register_block_handler, "timm.models.cspnet:CrossStage", "timm.models.cspnet:CrossStage3")
def cross_stage(block: nn.Module, sizes: StoredSizes) -> None:
    """CSPNet / CS3Darknet: ``x.split(self.expand_chs // 2, dim=1)`` after conv_exp"""
    block.expand_chs = 2 * sizes(block.expand_chs // 2)


@register_present(register_block_handler, "timm.models.res2net:Bottle2neck")
def bottle2neck(block: nn.Module, sizes: StoredSizes) -> None:
    """Res2Net: ``torch.split(out, self.width, 1)`` into ``scale`` pieces"""
    block.width = sizes(block.width)


@register_present(register_block_handler, "timm.models.ghostnet:GhostModule", "timm.models.ghostnet:GhostModuleV2")
def ghost_module(block: nn.Module, sizes: StoredSizes) -> None:
    """GhostNet: ``out[:, :self.out_chs]`` of the primary and cheap features"""
    block.out_chs = sizes(block.out_chs)


@register_present(register_block_handler, "timm.models.rexnet:LinearBottleneck")
def rexnet_bottleneck(block: nn.Module, sizes: StoredSizes) -> None:
    """RexNet: the partial residual ``x[:, 0:self.in_channels] + shortcut``"""
    block.in_channels = sizes(block.in_channels)


@register_present(register_block_handler, "timm.models.dpn:DualPathBlock")
def dual_path(block: nn.Module, sizes: StoredSizes) -> None:
    """DPN: residual and dense paths ``x[:, :self.num_1x1_c]`` / ``x[:, self.num_1x1_c:]``"""
    block.num_1x1_c = sizes(block.num_1x1_c)


@register_present(register_block_handler, "timm.layers:SelectiveKernel")
def selective_kernel(block: nn.Module, sizes: StoredSizes) -> None:
    """SKNet: ``torch.split(x, self.in_channels // self.num_paths, 1)`` across the kernel paths"""
    block.in_channels = sizes(block.in_channels // block.num_paths) * block.num_paths


@register_present(register_block_handler, "timm.layers:MixedConv2d")
def mixed_conv(block: nn.Module, sizes: StoredSizes) -> None:
    """MixNet: ``torch.split(x, self.splits, 1)`` across kernel sizes"""
    block.splits = sizes.pieces(block.splits)
    block.in_channels = sum(block.splits)


@register_present(register_block_handler, "timm.models.fasternet:Partial_conv3")
def partial_conv(block: nn.Module, sizes: StoredSizes) -> None:
    """FasterNet: ``torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)``"""
    block.dim_conv3, block.dim_untouched = sizes.pieces([block.dim_conv3, block.dim_untouched])


@register_present(register_block_handler, "timm.models.inception_next:InceptionDWConv2d")
def inception_dw(block: nn.Module, sizes: StoredSizes) -> None:
    """InceptionNeXt: ``torch.split(x, self.split_indexes, dim=1)`` into identity and band branches"""
    block.split_indexes = tuple(sizes.pieces(block.split_indexes))


@register_present(register_block_handler, "timm.models.mambaout:GatedConvBlock")
def gated_conv(block: nn.Module, sizes: StoredSizes) -> None:
    """MambaOut: ``torch.split(x, self.split_indices, dim=-1)`` into the gate, an identity and a conv part"""
    block.split_indices = tuple(sizes.pieces(block.split_indices))


@register_present(
    register_block_handler,
    "timm.models.maxxvit:Attention2d",
    "timm.layers:Attention",
    "timm.layers:AttentionPoolLatent",
    "timm.models.cait:ClassAttn",
    "timm.models.cait:TalkingHeadAttn",
    "timm.models.coat:FactorAttnConvRelPosEnc",
    "timm.models.crossvit:CrossAttention",
    "timm.models.davit:ChannelAttention",
    "timm.models.davit:ChannelAttentionV2",
    "timm.models.davit:WindowAttention",
    "timm.models.eva:EvaAttention",
    "timm.models.metaformer:Attention",
    "timm.models.nest:Attention",
    "timm.models.pvt_v2:Attention",
    "timm.models.twins:GlobalSubSampleAttn",
    "timm.models.twins:LocallyGroupedAttn",
    "timm.models.vision_transformer_relpos:RelPosAttention",
    "timm.models.beit:Attention",
    "timm.models.lowformer:ConvAttention",
    "timm.models.nextvit:EfficientAttention",
    "timm.models.swin_transformer:WindowAttention",
    "timm.models.swin_transformer_v2:WindowAttention",
    "timm.models.swin_transformer_v2_cr:WindowMultiHeadAttention",
    "timm.models.visformer:Attention",
    "torchvision.models.maxvit:RelativePositionalMultiHeadAttention",
    "timm.models.xcit:XCA",
    "timm.models.convit:GPSA",
    "timm.models.convit:MHSA",
    "timm.models.fastvit:Attention",
    heads=True,
)
def attention_heads(block: nn.Module, sizes: StoredSizes) -> None:
    """Attention that reshapes to its stored head count (``reshape(B, N, 3, self.num_heads, head_dim)``,
    MaxViT's ``view(B, self.num_heads, self.dim_head * 3, -1)``; torchvision's MaxViT calls them ``n_heads``,
    DaViT's channel attention ``groups``; XCiT's cross-covariance attention): widening adds heads, the head dim
    stays. Its inner width (``attn_dim``), when stored, and a relative position bias (its table widened with the
    heads) follow."""
    heads = next(name for name in ("num_heads", "n_heads", "groups") if hasattr(block, name))
    setattr(block, heads, sizes(getattr(block, heads)))
    for inner in ("attn_dim", "attention_dim", "o_proj_inpdim"):
        if hasattr(block, inner):
            setattr(block, inner, sizes.get(getattr(block, inner)))
    rel_pos = getattr(block, "rel_pos", None)
    if rel_pos is not None:
        if hasattr(rel_pos, "bias_shape"):
            rel_pos.bias_shape = (*rel_pos.bias_shape[:-1], getattr(block, heads))
        if hasattr(rel_pos, "num_heads"):
            rel_pos.num_heads = getattr(block, heads)


@register_present(register_block_handler, "timm.models.shvit:SHSA")
def shvit_attention(block: nn.Module, sizes: StoredSizes) -> None:
    """SHViT's single-head attention on part of the channels: ``torch.split(x, [self.pdim, self.dim - self.pdim])``,
    ``torch.split(qkv, [self.qk_dim, self.qk_dim, self.pdim])``, ``reshape(B, self.pdim, H, W)``"""
    block.pdim, rest = sizes.pieces([block.pdim, block.dim - block.pdim])
    block.dim, block.qk_dim = block.pdim + rest, sizes.get(block.qk_dim)


@register_present(register_block_handler, "timm.models.vision_transformer:ParallelScalingBlock", heads=True)
def parallel_scaling(block: nn.Module, sizes: StoredSizes) -> None:
    """ViT-22B's parallel block: ``torch.split(y, self.in_split, dim=-1)`` of one projection into the MLP and
    q, k, v, then ``q.view(B, N, self.num_heads, self.head_dim)``: widening adds heads"""
    block.in_split = sizes.pieces(block.in_split)
    block.num_heads = sizes(block.num_heads)


@register_present(register_block_handler, "torchvision.models.swin_transformer:ShiftedWindowAttention")
def swin_attention(block: nn.Module, sizes: StoredSizes) -> None:
    """torchvision's Swin: ``shifted_window_attention(..., self.num_heads, ...)`` (V2: ``view(-1, self.num_heads)``
    of its bias MLP): widening adds heads"""
    block.num_heads = sizes(block.num_heads)


@register_present(register_block_handler, "torchvision.models.vision_transformer:VisionTransformer")
def vision_transformer(block: nn.Module, sizes: StoredSizes) -> None:
    """torchvision's ViT: the patch embedding's ``x.reshape(n, self.hidden_dim, n_h * n_w)``"""
    block.hidden_dim = sizes(block.hidden_dim)


@register_present(register_layer_rule, "timm.models.vgg:ConvMlp")
def vgg_conv_mlp(an, step, layer):
    """VGG's pre-logits (a leaf: it pools a small input first): ``fc1`` (a 7x7 conv), then ``fc2``"""
    return layers_in_sequence(an, step, ("fc1", "fc2"))


@register_present(register_layer_rule, "timm.models.twins:LocallyGroupedAttn")
def twins_local_attention(an, step, layer):
    """Twins' windowed attention (a leaf: it pads to whole windows): ``qkv`` in heads of ``C // self.num_heads``,
    ``proj``"""
    return attention_leaf(an, step, layer.num_heads, ["qkv"], "proj")


@register_present(register_layer_rule, "timm.models.convit:GPSA")
def convit_gated_attention(an, step, layer):
    """ConViT's gated positional attention (a leaf: it caches relative indices): ``qk`` and ``v`` in heads,
    ``proj``; ``pos_proj`` and ``gating_param`` have one entry per head"""
    return attention_leaf(an, step, layer.num_heads, ["qk", "v"], "proj", per_head=["pos_proj", "gating_param"])


@register_present(register_layer_rule, "timm.models.tiny_vit:TinyVitBlock")
def tiny_vit_block(an, step, layer):
    """TinyViT's block (a leaf: it pads to whole windows): ``attn`` (its ``qkv`` reads the stream, ``proj`` writes
    it; the per-head widths between, split at stored sizes, stay), a depthwise ``local_conv``, then ``mlp``"""
    stream = step.src
    heads = layers_in_sequence(an, step, ["attn.norm", "attn.qkv"])
    an.fix_all([heads], f"TinyViT attention '{step.node.target}.attn' splits its heads' q, k, v at stored sizes")
    merged = (stream[0], (an.groups.new(layer.attn.proj.in_features, f"heads of '{step.node.target}.attn'"),))
    return add_to_stream(
        an,
        stream,
        layers_in_sequence(an, step, ["attn.proj"], merged),
        layers_in_sequence(an, step, ["local_conv.conv", "local_conv.bn"]),
        layers_in_sequence(an, step, ["mlp.norm", "mlp.fc1", "mlp.fc2"]),
    )


@register_present(register_layer_rule, "timm.models.mobilevit:MobileVitV2Block")
def mobilevit_v2_block(an, step, layer):
    """MobileViT-v2's block (a leaf: it resizes its input to whole patches): ``conv_kxk`` (depthwise), ``conv_1x1`` into
    the transformer's width; in each ``LinearTransformerBlock`` ``attn.qkv_proj`` splits into 1 query channel and keys
    and values of one width, ``attn.out_proj`` and the MLP add to the stream; then ``norm`` and ``conv_proj``"""
    x = layers_in_sequence(an, step, ["conv_kxk.conv", "conv_kxk.bn", "conv_1x1"])
    for i, block in enumerate(layer.transformer):
        p = f"transformer.{i}"
        qkv = layers_in_sequence(an, step, [f"{p}.norm1", f"{p}.attn.qkv_proj"], x)
        query, key, value = split_in_leaf(an, step, qkv, [1, block.attn.embed_dim, block.attn.embed_dim], f"{p}.attn")
        an.fix_all([(qkv[0], query)], f"MobileViT-v2's query '{step.node.target}.{p}.attn' (one channel)")
        values = an.groups.union_layouts(an.groups.align([key, value]))  # relu(v) * context(k): one layout
        add_to_stream(
            an,
            x,
            layers_in_sequence(an, step, [f"{p}.attn.out_proj"], (x[0], values)),
            layers_in_sequence(an, step, [f"{p}.norm2", f"{p}.mlp.fc1", f"{p}.mlp.fc2"], x),
        )
    return layers_in_sequence(
        an,
        step,
        ["norm", "conv_proj.conv", "conv_proj.bn"] if hasattr(layer.conv_proj, "conv") else ["norm", "conv_proj"],
        x,
    )


@register_present(register_block_handler, "timm.models.mobilevit:LinearSelfAttention")
def mobilevit_linear_attention(block: nn.Module, sizes: StoredSizes) -> None:
    """MobileViT-v2's linear attention: ``qkv.split([1, self.embed_dim, self.embed_dim], dim=1)``"""
    block.embed_dim = sizes(1 + block.embed_dim) - 1


@register_present(register_block_handler, "timm.models.metaformer:Scale")
def metaformer_scale(block: nn.Module, sizes: StoredSizes) -> None:
    """MetaFormer (CAFormer, ConvFormer): ``x * self.scale.view(self.shape)`` with ``shape = (dim, 1, 1)``"""
    block.shape = (sizes(block.shape[0]), *block.shape[1:])
