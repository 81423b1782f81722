"""Rules for calls that read a layer's (or the model's) parameters instead of calling the layer.

``F.linear(x, self.qkv.weight, bias)`` (BEiT, EVA: a bias made of separate q and v parameters) is
the layer ``qkv`` to the analysis; torchvision's Swin hands its layers' weights to one traced
function, ``shifted_window_attention``, whose q, k, v have the input's width in whole heads.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..handlers import channel_handler
from .axes import shape_of
from .context import ChannelAnalysis, Located, Step
from .layer_layouts import weight_layout
from .node_rules import register_node_rule

__all__: list = []  # rules only: they register themselves


def _owner(an: ChannelAnalysis, param: Any, attr: str) -> Optional[Tuple[str, nn.Module]]:
    """(path, layer) when ``param`` is the get_attr of a conv/linear layer's own ``attr`` parameter."""
    if not isinstance(param, fx.Node) or param.op != "get_attr":
        return None
    path, _, name = param.target.rpartition(".")
    layer = an.model.get_submodule(path) if name == attr else None
    handler = channel_handler(layer) if layer is not None else None
    return (path, layer) if handler is not None and handler.maps_channels else None


def _on_last_dim(an: ChannelAnalysis, tensor: Any) -> Optional[Located]:
    """The layout of a tensor whose channels are its last dim (a position embedding, a bias table): a
    parameter's last dim gets a group; None when the channels are elsewhere or not known."""
    if not isinstance(tensor, fx.Node) or shape_of(tensor) is None:
        return None
    laid = an.lay(tensor)
    if laid is not None:
        return laid if laid[0] == len(shape_of(tensor)) - 1 else None
    root = an.floating.get(tensor, tensor)  # CLIP's pos_embed.unsqueeze(0): the parameter's last dim is the tensor's
    return (len(shape_of(tensor)) - 1, an.table_parameter(root)[1]) if root.op == "get_attr" else None


def _argument(node: fx.Node, at: int, name: str) -> Any:
    return node.kwargs.get(name, node.args[at] if len(node.args) > at else None)


@register_node_rule(F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv2d, parameters=True)
def functional_layer(an: ChannelAnalysis, step: Step) -> Any:
    """``F.linear(x, layer.weight, bias)``: the layer, called through its weight; a bias that is not the
    layer's own (a concatenation of q/k/v bias parameters) takes the output's channels"""
    node, src = step.node, an.lay(_argument(step.node, 0, "input"))
    owner = _owner(an, _argument(node, 1, "weight"), "weight")
    if owner is None or src is None:
        return NotImplemented
    path, layer = owner
    bias = _argument(node, 2, "bias")
    own_bias = bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{path}.bias")
    if not own_bias and (an.lay(bias) is None or an.lay(bias)[0] != 0):
        return NotImplemented
    located = weight_layout(an, step, path, layer, channel_handler(layer), src)
    if not own_bias and located is not None:  # the output (one group) lines up with the bias's segments
        segments = an.groups.align([an.lay(bias)[1], an.outputs[path]])
        an.groups.union_layouts(segments)
        an.record_layer(path, outputs=an.groups.expand(an.outputs[path]))
        located = located[0], an.outputs[path]
    return located


@register_node_rule(
    names=("resample_abs_pos_embed", "resample_abs_pos_embed_nhwc", "resample_pos_embed_grid"), parameters=True
)
def resampled_position_embedding(an: ChannelAnalysis, step: Step) -> Any:
    """timm's position embedding resampled to the input size (dynamic image size; Qwen3-ViT's grid): its last dim,
    the channels, stays"""
    embed = step.node.args[0] if step.node.args else None
    src = _on_last_dim(an, embed)
    if src is None or step.shape is None or step.shape[-1] != shape_of(embed)[-1]:
        return NotImplemented
    return len(step.shape) - 1, src[1]


@register_node_rule(names=("_get_relative_position_bias",), parameters=True)
def relative_position_bias(an: ChannelAnalysis, step: Step) -> Any:
    """torchvision's Swin: ``table[index]`` as a (1, heads, N, N) bias: the table's last dim (heads) on dim 1"""
    src = _on_last_dim(an, step.node.args[0])
    return NotImplemented if src is None else (1, src[1])


@register_node_rule(names=("shifted_window_attention",), parameters=True)
def shifted_window_attention(an: ChannelAnalysis, step: Step) -> Any:
    """torchvision's Swin attention: q, k, v have the input's width (``C // num_heads`` per head), in
    whole heads of a fixed dim; the head count (the block stores it) follows the bias and logit scale"""
    node, src = step.node, step.src
    qkv, proj = (
        _owner(an, _argument(node, 1, "qkv_weight"), "weight"),
        _owner(an, _argument(node, 2, "proj_weight"), "weight"),
    )
    heads, bias = _argument(node, 5, "num_heads"), an.lay(_argument(node, 3, "relative_position_bias"))
    biases = [(_argument(node, at, name), layer) for at, name, layer in ((9, "qkv_bias", qkv), (10, "proj_bias", proj))]
    if (
        src is None
        or qkv is None
        or proj is None
        or not isinstance(heads, int)
        or bias is None
        or bias[0] != 1
        or src[0] != len(step.src_shape) - 1
        or len(src[1]) != 1
        or len(bias[1]) != 1
        or any(b is not None and getattr(b, "target", None) != f"{layer[0]}.bias" for b, layer in biases)
    ):
        return NotImplemented
    stream = src[1][0]
    an.record_layer(qkv[0], inputs=src[1], outputs=src[1] * 3)
    an.record_layer(proj[0], inputs=src[1])
    an.role(qkv[0], "conv", src[1])
    an.role(proj[0], "conv", src[1])
    out = an.groups.new(int(proj[1].out_features))
    an.record_layer(proj[0], outputs=(out,))
    head = bias[1][0]
    an.groups.multiply(stream, head, an.groups.width[an.groups.find(stream)] // heads, 1)
    scale = _argument(node, 11, "logit_scale")
    if isinstance(scale, fx.Node) and scale.op == "get_attr":  # Swin V2: a (heads, 1, 1) parameter
        placed = an.lay(scale) or an.parameter_group(scale, 0)
        an.groups.union(head, placed[1][0])
    if not an.stored(step, heads, (head,)):
        an.fix_all([src, bias], f"{node.name} (shifted_window_attention) hard-codes {heads} heads")
    return src[0], (out,)


@register_node_rule(F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm)
def functional_norm(an: ChannelAnalysis, step: Step) -> Any:
    """``F.layer_norm(x, shape, ...)`` / ``F.group_norm(x, groups, ...)`` traced inside a norm layer kapify has no
    rule for (a LayerNorm subclass with its own forward): the call holds the normalised shape or the group count
    as a number, so channels it normalises keep their width; the output keeps the input's layout"""
    node, src, shape = step.node, step.src, step.src_shape
    if src is None or shape is None:
        return NotImplemented
    if node.target in (F.layer_norm, torch.layer_norm):
        normalized = _argument(node, 1, "normalized_shape")
        count = len(normalized) if isinstance(normalized, (tuple, list)) else 1
        if src[0] >= len(shape) - count:
            an.fix_all([src], f"{node.name} (layer_norm) holds its normalized shape {normalized} in the traced graph")
    elif src[0] == 1:
        an.fix_all([src], f"{node.name} (group_norm) holds its group count in the traced graph")
    return src
