"""Resizing a layer's channels in place, by layer type (the handler registry users extend).

A handler says which channel counts a layer has and how to give it new ones. Old channels keep
their values (placed where ``in_index`` / ``out_index`` say); new entries come from the layer's own
``reset_parameters`` on the new shape, or are zero where ``zero_new_inputs`` asks (Net2Net-style
function preservation: a new input channel then contributes nothing).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Type

import torch
from torch import nn

from .optional import optional_imports
from .regroup import regroup

__all__ = [
    "ChannelHandler",
    "register_channel_handler",
    "channel_handler",
    "resize_layer",
    "resize_parameter",
    "CHANNEL_HANDLERS",
]


@dataclass
class ChannelHandler:
    """How one layer type exposes and changes its channels.

    ``kind``: "conv"/"linear" (in and out channels are independent, except depthwise convs),
    "channelwise" (one channel count, e.g. BatchNorm: output channels = input channels), "attention"
    (self-attention whose query, key, value and output share one width, widened by whole heads of
    ``unit_attr`` channels: ``nn.MultiheadAttention``).
    ``channels_normalised``: the layer mixes statistics across its input channels (GroupNorm,
    LayerNorm, weight-standardised convs), so adding channels changes its outputs for the old ones.
    ``axis``: the input dim that holds the channels (1 for NCHW layers, -1 for Linear and
    channels-last LayerNorm). An attribute holding a shape (``normalized_shape``) counts its last entry,
    one holding a parameter (EvoNorm's ``weight``) its length. ``groups_attr``: the attribute holding the
    number of channel groups its statistics run over (GroupNorm's ``num_groups``); a norm of several
    groups widens by whole new groups of the same size.
    ``resize``: ``resize(module, new_in, in_index, new_out, out_index, zero_new_inputs)`` for a layer whose
    parameters the generic code cannot lay out (packed q, k, v projections, CondConv's flattened experts).
    """

    kind: str
    in_attr: str
    out_attr: str
    channels_normalised: bool = False
    axis: int = 1
    unit_attr: Optional[str] = None
    groups_attr: Optional[str] = None
    resize: Optional[Callable[[nn.Module, int, torch.Tensor, int, torch.Tensor, bool], None]] = None

    @staticmethod
    def count(module: nn.Module, attr: str) -> int:
        value = getattr(module, attr)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
        return int(value[-1]) if isinstance(value, (tuple, list)) else int(value)

    @staticmethod
    def set_count(module: nn.Module, attr: str, channels: int) -> None:
        value = getattr(module, attr)
        if attr not in module._parameters and attr not in module._buffers:  # a parameter is resized with the others
            setattr(module, attr, (*value[:-1], channels) if isinstance(value, (tuple, list)) else channels)


CHANNEL_HANDLERS: Dict[Type[nn.Module], ChannelHandler] = {}


def register_channel_handler(module_type: Type[nn.Module], handler: ChannelHandler) -> None:
    """Teach re-widening a layer type: ``register_channel_handler(MyNorm, ChannelHandler("channelwise", "dim",
    "dim"))``."""
    CHANNEL_HANDLERS[module_type] = handler


register_channel_handler(
    nn.modules.conv._ConvNd, ChannelHandler("conv", "in_channels", "out_channels")
)  # Conv1d/2d/3d and subclasses
register_channel_handler(
    nn.Linear, ChannelHandler("linear", "in_features", "out_features", axis=-1)
)  # heads, channels-last MLPs
register_channel_handler(
    nn.modules.batchnorm._NormBase, ChannelHandler("channelwise", "num_features", "num_features")
)  # BatchNorm*, InstanceNorm*
register_channel_handler(
    nn.GroupNorm,
    ChannelHandler(  # stats over channel groups
        "channelwise", "num_channels", "num_channels", channels_normalised=True, groups_attr="num_groups"
    ),
)
register_channel_handler(
    nn.LayerNorm,
    ChannelHandler(  # channels-last LayerNorm (ConvNeXt blocks); 1-D normalized_shape
        "channelwise", "normalized_shape", "normalized_shape", channels_normalised=True, axis=-1
    ),
)


def _register_present(paths: Sequence[str], handler: ChannelHandler, used_for: str) -> None:
    """``handler`` for each of the timm/torchvision classes ``paths`` names that exists (the rest are recorded)."""
    for cls in optional_imports(*paths, used_for=f"channel handler: {used_for}"):
        register_channel_handler(cls, handler)


_register_present(
    [
        "timm.layers:StdConv2d",
        "timm.layers:StdConv2dSame",
        "timm.layers:ScaledStdConv2d",
        "timm.layers:ScaledStdConv2dSame",
    ],
    ChannelHandler("conv", "in_channels", "out_channels", channels_normalised=True),
    "weight-standardised convs normalise each filter over its input channels",
)
_register_present(
    [
        "timm.layers:LayerNorm2d",
        "timm.layers:LayerNorm2dFp32",
        "timm.layers:LayerNormAct2d",
        "timm.layers:LayerNormAct2dFp32",
        "torchvision.models.convnext:LayerNorm2d",
    ],
    ChannelHandler("channelwise", "normalized_shape", "normalized_shape", True, axis=1),
    "LayerNorms over dim 1 of NCHW (ConvNeXt stem and downsampling, MaxxViT; some subclass nn.LayerNorm)",
)
_register_present(
    ["timm.layers:RmsNorm", "timm.layers:RmsNormFp32", "timm.layers:SimpleNorm", "timm.layers:SimpleNormFp32"],
    ChannelHandler("channelwise", "normalized_shape", "normalized_shape", True, axis=-1),
    "RMS norms over the last dim (plain nn.Modules)",
)
_register_present(
    ["timm.layers:RmsNorm2d", "timm.layers:RmsNorm2dFp32", "timm.layers:SimpleNorm2d", "timm.layers:SimpleNorm2dFp32"],
    ChannelHandler("channelwise", "normalized_shape", "normalized_shape", True, axis=1),
    "RMS norms over dim 1 of NCHW",
)
_register_present(
    ["timm.layers:BlurPool2d"],
    ChannelHandler("channelwise", "channels", "channels"),
    "anti-aliasing: one blur filter per channel",
)
_register_present(
    ["timm.layers:EvoNorm2dS0", "timm.layers:EvoNorm2dS1", "timm.layers:EvoNorm2dS2"],
    ChannelHandler("channelwise", "weight", "weight", True, groups_attr="groups"),
    "EvoNorm S (and their 'a' subclasses): group statistics, no width attribute",
)


def channel_handler(module: nn.Module) -> Optional[ChannelHandler]:
    """The handler of ``module``'s most specific registered base class, or None."""
    for cls in type(module).__mro__:
        if cls in CHANNEL_HANDLERS:
            return CHANNEL_HANDLERS[cls]
    return None


def _leading(index: torch.Tensor) -> bool:
    """Whether ``index`` keeps the old channels first, in order (a slice can place them)."""
    return torch.equal(index, torch.arange(len(index)))


def _place(
    old: torch.Tensor, new: torch.Tensor, out_index: torch.Tensor, in_index: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``new`` (written in place) with ``old[i]`` (and ``old[i, j]``) at ``new[out_index[i]]`` (``[..,
    in_index[j]]``)."""
    old = old.to(new.dtype)
    if _leading(out_index) and (in_index is None or _leading(in_index)):  # old channels first: one slice copy
        new[tuple(slice(0, n) for n in old.shape[: 1 if in_index is None else 2])] = old
        return new
    if in_index is None:
        return new.index_copy_(0, out_index, old)
    rows = new.index_select(0, out_index)
    rows.index_copy_(1, in_index, old)
    return new.index_copy_(0, out_index, rows)


def _place_grouped(
    old: torch.Tensor,
    new: torch.Tensor,
    in_index: torch.Tensor,
    out_index: torch.Tensor,
    groups: int,
    new_groups: int,
    transposed: bool,
    zero_new_inputs: bool,
) -> torch.Tensor:
    """A grouped conv's weight with old channels moved (``in_index``, ``out_index``) into ``new_groups`` groups that
    each hold whole old ones (:func:`~kapify.surgery.regroup.regroup`); with ``zero_new_inputs`` every old output
    reads only its old inputs (new ones and other old groups merged into its group give 0)."""
    rows, cols = (in_index, out_index) if transposed else (out_index, in_index)
    new_cols = new.shape[1]  # per new group
    local = (cols.view(groups, -1) % new_cols).repeat_interleave(len(rows) // groups, dim=0)
    out = new  # fresh: written in place, as by _place
    if zero_new_inputs and transposed:  # rows are inputs: zero every entry that feeds an old output
        old_out = torch.zeros(new_groups * new_cols, dtype=torch.bool)
        old_out[out_index] = True
        out[old_out.view(new_groups, new_cols)[torch.arange(new.shape[0]) // (new.shape[0] // new_groups)]] = 0
    elif zero_new_inputs:
        out[out_index] = 0
    out[rows[:, None], local] = old.to(out.dtype)
    return out


def resize_layer(
    module: nn.Module,
    new_in: Optional[int] = None,
    in_index: Optional[torch.Tensor] = None,
    new_out: Optional[int] = None,
    out_index: Optional[torch.Tensor] = None,
    zero_new_inputs: bool = False,
    init_fn: Optional[Callable[[nn.Module], None]] = None,
) -> None:
    """Give ``module`` ``new_in`` input / ``new_out`` output channels in place (same object, class,
    hooks). ``in_index[i]`` / ``out_index[i]`` = new position of old channel i (default: 0..C-1); with
    unchanged counts, indices that are a permutation reorder the channels."""
    handler = channel_handler(module)
    if handler is None:
        raise TypeError(
            f"no channel handler for {type(module).__name__}; register one with kapify.register_channel_handler"
        )
    if getattr(module, handler.in_attr) is None:  # a layer that takes any width (BlurPool2d(channels=None))
        return
    old_in, old_out = handler.count(module, handler.in_attr), handler.count(module, handler.out_attr)
    if handler.kind in ("channelwise", "attention"):
        new_in = new_out = new_out or new_in
        in_index = out_index = out_index if out_index is not None else in_index
    new_in, new_out = new_in or old_in, new_out or old_out
    in_index = torch.arange(old_in) if in_index is None else in_index
    out_index = torch.arange(old_out) if out_index is None else out_index
    if (
        (new_in, new_out) == (old_in, old_out)
        and torch.equal(in_index, torch.arange(old_in))
        and torch.equal(out_index, torch.arange(old_out))
    ):  # no new channels, none moved
        return
    if handler.resize is not None:
        handler.resize(module, new_in, in_index, new_out, out_index, zero_new_inputs)
        return
    groups = getattr(module, "groups", 1)
    grouped = handler.kind == "conv" and groups > 1  # whole new groups (depth multipliers too), each wider, or merged
    new_groups = regroup(in_index, out_index, groups, new_in, new_out) if grouped else groups
    if new_groups is None:
        raise ValueError(
            f"{type(module).__name__} has {groups} groups of {old_in // groups} -> {old_out // groups} channels: "
            f"the new layout of {new_in} -> {new_out} channels puts one group's channels in different groups"
        )
    transposed = handler.kind == "conv" and getattr(module, "transposed", False)  # weight is (in, out / groups, ...)
    tensors = [
        (name, t)
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if t is not None and t.dim() > 0
    ]
    fresh = copy.deepcopy(module, {id(t): None for _, t in tensors})  # the tensors it gets new ones for: not copied
    handler.set_count(fresh, handler.in_attr, new_in)
    handler.set_count(fresh, handler.out_attr, new_out)
    if grouped:
        fresh.groups = new_groups
    shapes: Dict[str, tuple] = {}
    for name, tensor in tensors:
        shape = list(tensor.shape)
        if name == "weight" and transposed:
            shape[0], shape[1] = new_in, new_out // fresh.groups
        elif handler.kind in ("conv", "linear") and name == "weight":
            shape[0] = new_out
            shape[1] = new_in // fresh.groups if handler.kind == "conv" else new_in
        else:  # bias, norm weight/bias/running stats: one entry per output channel
            shape[0] = new_out
        shapes[name] = tuple(shape)
        empty = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        if isinstance(tensor, nn.Parameter):
            setattr(fresh, name, nn.Parameter(empty, requires_grad=tensor.requires_grad))
        else:
            setattr(fresh, name, empty)
    if hasattr(fresh, "reset_parameters"):
        (init_fn or (lambda m: m.reset_parameters()))(fresh)
    elif hasattr(fresh, "reset_running_stats"):
        fresh.reset_running_stats()
    for name in shapes:
        old, new = getattr(module, name), getattr(fresh, name).detach()
        if grouped and name == "weight":
            value = _place_grouped(
                old.detach(), new, in_index, out_index, groups, new_groups, transposed, zero_new_inputs
            )
        elif handler.kind in ("conv", "linear") and name == "weight":
            rows, columns = (in_index, out_index) if transposed else (out_index, in_index)
            if zero_new_inputs:  # outgoing weights of new input channels start at 0 (Net2Net)
                input_dim, input_index = (0, rows) if transposed else (1, columns)
                keep = torch.zeros(new.shape[input_dim], dtype=torch.bool)
                keep[input_index] = True
                new = new.clone()
                new[(slice(None),) * input_dim + (~keep,)] = 0
            value = _place(old.detach(), new, rows, columns)
        else:
            value = _place(old.detach(), new, out_index)
        if isinstance(old, nn.Parameter):
            setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            setattr(module, name, value)
    handler.set_count(module, handler.in_attr, new_in)
    handler.set_count(module, handler.out_attr, new_out)
    if grouped:
        module.groups = fresh.groups
    groups = getattr(module, handler.groups_attr) if handler.groups_attr else 1
    if groups > 1 and new_out % (old_out // groups) == 0:  # new channels are new groups of the same size
        setattr(module, handler.groups_attr, new_out // (old_out // groups))


def resize_parameter(owner: nn.Module, name: str, dim: int, size: int, index: torch.Tensor) -> None:
    """Give parameter ``owner.<name>`` ``size`` entries along ``dim``; old entry i goes to ``index[i]``
    and new entries start at the mean of the old ones (LayerScale's gamma: its init value)."""
    old = getattr(owner, name)
    shape = list(old.shape)
    shape[dim] = size
    value = torch.full(shape, old.detach().mean().item(), dtype=old.dtype, device=old.device)
    value.index_copy_(dim, index.to(old.device), old.detach())
    setattr(
        owner, name, nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    )


def _resize_multihead_attention(
    module: nn.MultiheadAttention,
    new_in: int,
    in_index: torch.Tensor,
    size: int,
    index: torch.Tensor,
    zero_new_inputs: bool,
) -> None:
    """``nn.MultiheadAttention`` with ``size`` channels (in = out): the q, k and v rows of the packed
    ``in_proj_weight``, its columns and ``out_proj`` follow ``index``; the head dim stays, so the new channels are
    new heads."""
    if size % module.head_dim or not module._qkv_same_embed_dim:
        raise ValueError(
            f"MultiheadAttention with heads of {module.head_dim} channels (keys/values of {module.kdim}/{module.vdim}) "
            f"cannot take {size} channels: it widens by whole heads, with keys and values of its own width"
        )
    weight = module.in_proj_weight
    fresh = nn.MultiheadAttention(
        size,
        size // module.head_dim,
        bias=module.in_proj_bias is not None,
        add_bias_kv=module.bias_k is not None,
        batch_first=module.batch_first,
        device=weight.device,
        dtype=weight.dtype,
    )
    rows = torch.cat([piece * size + index for piece in range(3)])  # q, k, v: one head layout each
    new_weight = fresh.in_proj_weight.detach()
    if zero_new_inputs:
        new_weight[:, ~torch.isin(torch.arange(size), index)] = 0
    module.in_proj_weight = nn.Parameter(_place(weight.detach(), new_weight, rows, index), weight.requires_grad)
    if module.in_proj_bias is not None:
        module.in_proj_bias = nn.Parameter(
            _place(module.in_proj_bias.detach(), fresh.in_proj_bias.detach(), rows), module.in_proj_bias.requires_grad
        )
    for name in ("bias_k", "bias_v"):  # (1, 1, E) learned key/value rows
        old = getattr(module, name)
        if old is not None:
            value = getattr(fresh, name).detach().clone()
            value[..., index] = old.detach()
            setattr(module, name, nn.Parameter(value, old.requires_grad))
    resize_layer(
        module.out_proj, new_in=size, in_index=index, new_out=size, out_index=index, zero_new_inputs=zero_new_inputs
    )
    module.embed_dim = module.kdim = module.vdim = size
    module.num_heads = size // module.head_dim


register_channel_handler(
    nn.MultiheadAttention,
    ChannelHandler(  # self-attention: query, key, value and output share one width
        "attention", "embed_dim", "embed_dim", axis=-1, unit_attr="head_dim", resize=_resize_multihead_attention
    ),
)


def _resize_cond_conv(
    module: nn.Module, new_in: int, in_index: torch.Tensor, new_out: int, out_index: torch.Tensor, zero_new_inputs: bool
) -> None:
    """timm's ``CondConv2d``: each expert's flattened filters are resized as a plain conv's would be (new filters get a
    conv's own initialisation, CondConv's too); its stored ``weight_shape`` / ``bias_shape`` follow."""
    experts = []
    for e in range(module.num_experts):
        conv = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            groups=module.groups,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        conv.weight.data = module.weight.detach()[e].view(module.weight_shape).clone()
        if module.bias is not None:
            conv.bias.data = module.bias.detach()[e].clone()
        resize_layer(conv, new_in, in_index, new_out, out_index, zero_new_inputs)
        experts.append(conv)
    module.weight = nn.Parameter(
        torch.stack([c.weight.detach().flatten() for c in experts]), module.weight.requires_grad
    )
    if module.bias is not None:
        module.bias = nn.Parameter(torch.stack([c.bias.detach() for c in experts]), module.bias.requires_grad)
        module.bias_shape = (new_out,)
    module.in_channels, module.out_channels, module.groups = new_in, new_out, experts[0].groups
    module.weight_shape = tuple(experts[0].weight.shape)


_register_present(
    ["timm.layers:CondConv2d"],
    ChannelHandler("conv", "in_channels", "out_channels", resize=_resize_cond_conv),
    "CondConv's experts, flattened",
)
