"""Channel handlers: one per kind of layer, each saying where the layer keeps its channel counts and how it changes
their number (re-widening). The registry maps layer types to handlers; users extend it with
:func:`register_channel_handler`. How the channel analysis reads a layer is the handler's ``layout_rule``, a name
the analysis looks up (:mod:`kapify.surgery.channels.layer_layouts`); this module does not import the analysis.

A resize keeps the old channels' values (placed where ``in_index`` / ``out_index`` say); new entries come from the
layer's own ``reset_parameters`` on the new shape, or are zero where ``zero_new_inputs`` asks (Net2Net-style
function preservation: a new input channel then contributes nothing).
"""

from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from .optional import optional_imports
from .registry import Registry
from .regroup import regroup

__all__ = [
    "CHANNEL_HANDLERS",
    "ChannelHandler",
    "ChannelwiseHandler",
    "ConvHandler",
    "CondConvHandler",
    "GroupNormHandler",
    "LinearHandler",
    "MultiheadAttentionHandler",
    "channel_handler",
    "register_channel_handler",
    "resize_layer",
    "resize_parameter",
]

Layout = Tuple[int, ...]


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


class ChannelHandler:
    """How one layer type exposes and changes its channels (the base of the kinds below).

    ``in_attr`` / ``out_attr``: the attributes holding its input / output channel counts (a shape counts its last
    entry, a parameter its length). ``axis``: the input dim holding the channels (1 for NCHW layers, -1 for Linear
    and channels-last norms). ``channels_normalised``: the layer mixes statistics across its input channels
    (GroupNorm, LayerNorm, weight-standardised convs), so new channels change its outputs for the old ones.
    ``layout_rule`` names how the channel analysis reads it (``kapify.surgery.channels.layer_layouts``).
    Subclasses shape and fill the resized tensors (:meth:`tensor_shape`, :meth:`place`); a layer whose parameters
    need their own layout overrides :meth:`resize`.
    """

    carries_channels = False  # its output channels are its input channels (BatchNorm, self-attention)
    maps_channels = False  # a weight maps input to output channels (conv, linear): F.linear(x, layer.weight) is it
    reads_other_inputs = False  # what it does with tensor inputs besides the first is known (attention's k, v)
    passes_other_dims = False  # applied to a dim other than the channels, it leaves them where they are
    layout_rule = "weight"  # how the channel analysis reads it: a weight from input to new output channels

    def __init__(self, in_attr: str, out_attr: str, channels_normalised: bool = False, axis: int = 1) -> None:
        self.in_attr, self.out_attr, self.channels_normalised, self.axis = in_attr, out_attr, channels_normalised, axis

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_attr!r}, {self.out_attr!r})"

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

    # -- re-widening -------------------------------------------------------------------------------
    def resize(
        self,
        module: nn.Module,
        new_in: int,
        in_index: torch.Tensor,
        new_out: int,
        out_index: torch.Tensor,
        zero_new_inputs: bool,
        init_fn: Optional[Callable[[nn.Module], None]] = None,
    ) -> None:
        """Give ``module`` ``new_in`` / ``new_out`` channels in place, old channel i at ``in_index[i]`` /
        ``out_index[i]``: a fresh copy of the layer with the new counts is initialised by its own
        ``reset_parameters`` (or ``init_fn``), then each tensor gets the old values placed in it."""
        old_out = self.count(module, self.out_attr)
        tensors = [
            (name, t)
            for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            if t is not None and t.dim() > 0
        ]
        fresh = copy.deepcopy(module, {id(t): None for _, t in tensors})  # the tensors it gets new ones for
        self.set_count(fresh, self.in_attr, new_in)
        self.set_count(fresh, self.out_attr, new_out)
        self.prepare(module, fresh, in_index, out_index, new_in, new_out)
        for name, tensor in tensors:
            shape = self.tensor_shape(fresh, name, tensor.shape, new_in, new_out)
            empty = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            setattr(
                fresh, name, nn.Parameter(empty, requires_grad=tensor.requires_grad) if _is_param(tensor) else empty
            )
        if hasattr(fresh, "reset_parameters"):
            (init_fn or (lambda m: m.reset_parameters()))(fresh)
        elif hasattr(fresh, "reset_running_stats"):
            fresh.reset_running_stats()
        for name, old in tensors:
            new = getattr(fresh, name).detach()
            value = self.place(module, fresh, name, old.detach(), new, in_index, out_index, zero_new_inputs)
            setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad) if _is_param(old) else value)
        self.set_count(module, self.in_attr, new_in)
        self.set_count(module, self.out_attr, new_out)
        self.finish(module, fresh, old_out, new_out)

    def prepare(
        self, module: nn.Module, fresh: nn.Module, in_index: torch.Tensor, out_index: torch.Tensor, *counts: int
    ) -> None:
        """Adjust the fresh copy before its tensors are made (a grouped conv's new group count)."""

    def tensor_shape(self, fresh: nn.Module, name: str, shape: torch.Size, new_in: int, new_out: int) -> tuple:
        """The new shape of tensor ``name``: by default one entry per output channel on dim 0."""
        return (new_out, *shape[1:])

    def place(
        self,
        module: nn.Module,
        fresh: nn.Module,
        name: str,
        old: torch.Tensor,
        new: torch.Tensor,
        in_index: torch.Tensor,
        out_index: torch.Tensor,
        zero_new_inputs: bool,
    ) -> torch.Tensor:
        """``new`` (``fresh``'s tensor) with ``old``'s values in place; by default entry i at ``out_index[i]``."""
        return _place(old, new, out_index)

    def finish(self, module: nn.Module, fresh: nn.Module, old_out: int, new_out: int) -> None:
        """Anything left after the tensors (a group count)."""


def _is_param(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter)


class ChannelwiseHandler(ChannelHandler):
    """One channel count, output channels = input channels, one entry per channel (BatchNorm, BlurPool;
    LayerNorm and RMS norms with ``channels_normalised``): the channels pass through."""

    carries_channels = True
    passes_other_dims = True
    layout_rule = "channelwise"

    def __init__(self, attr: str, channels_normalised: bool = False, axis: int = 1) -> None:
        super().__init__(attr, attr, channels_normalised, axis)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_attr!r}, channels_normalised={self.channels_normalised})"


class GroupNormHandler(ChannelwiseHandler):
    """A norm over channel groups (GroupNorm, EvoNorm-S; ``groups_attr`` holds the group count): with several
    groups it widens by whole new groups of the same size (the old ones keep their statistics)."""

    layout_rule = "group_norm"

    def __init__(self, attr: str, groups_attr: str, axis: int = 1) -> None:
        super().__init__(attr, True, axis)
        self.groups_attr = groups_attr

    def finish(self, module: nn.Module, fresh: nn.Module, old_out: int, new_out: int) -> None:
        groups = getattr(module, self.groups_attr)
        if groups > 1 and new_out % (old_out // groups) == 0:  # new channels are new groups of the same size
            setattr(module, self.groups_attr, new_out // (old_out // groups))


class LinearHandler(ChannelHandler):
    """A linear layer (heads, channels-last MLPs): reads its input channels, produces a new group; weight (out, in)."""

    maps_channels = True
    passes_other_dims = True

    def __init__(self, in_attr: str = "in_features", out_attr: str = "out_features", axis: int = -1) -> None:
        super().__init__(in_attr, out_attr, axis=axis)

    def tensor_shape(self, fresh: nn.Module, name: str, shape: torch.Size, new_in: int, new_out: int) -> tuple:
        return (new_out, new_in, *shape[2:]) if name == "weight" else (new_out, *shape[1:])

    def place(self, module, fresh, name, old, new, in_index, out_index, zero_new_inputs) -> torch.Tensor:
        if name != "weight":
            return _place(old, new, out_index)
        return _place_filters(old, new, out_index, in_index, zero_new_inputs, input_dim=1)


def _place_filters(
    old: torch.Tensor,
    new: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
    zero_new_inputs: bool,
    input_dim: int,
) -> torch.Tensor:
    """A weight with ``old[i, j]`` at ``new[rows[i], columns[j]]``; with ``zero_new_inputs`` the outgoing weights of
    new input channels (on ``input_dim``) start at 0 (Net2Net)."""
    if zero_new_inputs:
        input_index = rows if input_dim == 0 else columns
        keep = torch.zeros(new.shape[input_dim], dtype=torch.bool)
        keep[input_index] = True
        new[(slice(None),) * input_dim + (~keep,)] = 0  # ``new`` is the fresh layer's: written in place
    return _place(old, new, rows, columns)


class ConvHandler(ChannelHandler):
    """A convolution (Conv1d/2d/3d, transposed, grouped; ``channels_normalised`` for weight-standardised ones):
    reads its input channels and produces a new group; a depthwise/grouped conv with equal in and out channels
    carries its input's. Grouped convs gain whole groups (depth multipliers too), each wider, or merge them."""

    maps_channels = True
    layout_rule = "conv"  # a weight; or, reading the channels as its length (ECA's Conv1d), any width runs

    def __init__(
        self, in_attr: str = "in_channels", out_attr: str = "out_channels", channels_normalised: bool = False
    ) -> None:
        super().__init__(in_attr, out_attr, channels_normalised)

    def prepare(self, module, fresh, in_index, out_index, *counts: int) -> None:
        groups = getattr(module, "groups", 1)
        if groups > 1:
            new_in, new_out = counts
            new_groups = regroup(in_index, out_index, groups, new_in, new_out)
            if new_groups is None:
                raise ValueError(
                    f"{type(module).__name__} has {groups} groups of {self.count(module, self.in_attr) // groups} -> "
                    f"{self.count(module, self.out_attr) // groups} channels: the new layout of {new_in} -> {new_out} "
                    f"channels puts one group's channels in different groups"
                )
            fresh.groups = new_groups

    def tensor_shape(self, fresh: nn.Module, name: str, shape: torch.Size, new_in: int, new_out: int) -> tuple:
        if name != "weight":
            return (new_out, *shape[1:])
        if getattr(fresh, "transposed", False):  # weight is (in, out / groups, ...)
            return (new_in, new_out // fresh.groups, *shape[2:])
        return (new_out, new_in // fresh.groups, *shape[2:])

    def place(self, module, fresh, name, old, new, in_index, out_index, zero_new_inputs) -> torch.Tensor:
        if name != "weight":
            return _place(old, new, out_index)
        transposed = getattr(module, "transposed", False)
        if module.groups > 1:
            return _place_grouped(
                old, new, in_index, out_index, module.groups, fresh.groups, transposed, zero_new_inputs
            )
        rows, columns = (in_index, out_index) if transposed else (out_index, in_index)
        return _place_filters(old, new, rows, columns, zero_new_inputs, input_dim=0 if transposed else 1)

    def finish(self, module: nn.Module, fresh: nn.Module, old_out: int, new_out: int) -> None:
        module.groups = fresh.groups


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


class CondConvHandler(ConvHandler):
    """timm's ``CondConv2d``: each expert's flattened filters are resized as a plain conv's would be (new filters get
    a conv's own initialisation, CondConv's too); its stored ``weight_shape`` / ``bias_shape`` follow."""

    def resize(self, module, new_in, in_index, new_out, out_index, zero_new_inputs, init_fn=None) -> None:
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


class MultiheadAttentionHandler(ChannelHandler):
    """``nn.MultiheadAttention`` (self-attention): query, key, value, read by one packed projection, and the output
    share one width, widened by whole heads of ``head_dim`` channels; its output is (attention, weights)."""

    carries_channels = True
    reads_other_inputs = True
    layout_rule = "attention"

    def __init__(self) -> None:
        super().__init__("embed_dim", "embed_dim", axis=-1)

    def resize(self, module, new_in, in_index, size, index, zero_new_inputs, init_fn=None) -> None:
        """The q, k and v rows of the packed ``in_proj_weight``, its columns and ``out_proj`` follow ``index``; the
        head dim stays, so the new channels are new heads."""
        if size % module.head_dim or not module._qkv_same_embed_dim:
            raise ValueError(
                f"MultiheadAttention with heads of {module.head_dim} channels (keys/values of {module.kdim}/"
                f"{module.vdim}) cannot take {size} channels: it widens by whole heads, with keys and values of its "
                f"own width"
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
            bias = _place(module.in_proj_bias.detach(), fresh.in_proj_bias.detach(), rows)
            module.in_proj_bias = nn.Parameter(bias, module.in_proj_bias.requires_grad)
        for name in ("bias_k", "bias_v"):  # (1, 1, E) learned key/value rows
            old = getattr(module, name)
            if old is not None:
                value = getattr(fresh, name).detach().clone()
                value[..., index] = old.detach()
                setattr(module, name, nn.Parameter(value, old.requires_grad))
        resize_layer(module.out_proj, size, index, size, index, zero_new_inputs)
        module.embed_dim = module.kdim = module.vdim = size
        module.num_heads = size // module.head_dim


#: layer classes -> their channel handler (subclasses included; the most specific class wins)
CHANNEL_HANDLERS: Registry[ChannelHandler] = Registry("channel handler")


def register_channel_handler(module_type: Type[nn.Module], handler: ChannelHandler, reason: str = "") -> None:
    """Teach the analysis and re-widening a layer type: ``register_channel_handler(MyNorm, ChannelwiseHandler("dim",
    channels_normalised=True))``; a layer with parameters of its own layout subclasses a handler and overrides
    ``resize``."""
    if not isinstance(handler, ChannelHandler):
        raise TypeError(f"register_channel_handler takes a ChannelHandler instance, got {handler!r}")
    CHANNEL_HANDLERS.add(module_type, handler, reason)


def channel_handler(module: nn.Module) -> Optional[ChannelHandler]:
    """The handler of ``module``'s most specific registered base class, or None."""
    return CHANNEL_HANDLERS.for_class(type(module))


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
    if handler.carries_channels:
        new_in = new_out = new_out or new_in
        in_index = out_index = out_index if out_index is not None else in_index
    new_in, new_out = new_in or old_in, new_out or old_out
    in_index = torch.arange(old_in) if in_index is None else in_index
    out_index = torch.arange(old_out) if out_index is None else out_index
    if (new_in, new_out) == (old_in, old_out) and _leading(in_index) and _leading(out_index):  # nothing moves
        return
    handler.resize(module, new_in, in_index, new_out, out_index, zero_new_inputs, init_fn)


def resize_parameter(owner: nn.Module, name: str, dim: int, size: int, index: torch.Tensor) -> None:
    """Give parameter ``owner.<name>`` ``size`` entries along ``dim``; old entry i goes to ``index[i]``
    and new entries start at the mean of the old ones (LayerScale's gamma: its init value)."""
    old = getattr(owner, name)
    shape = list(old.shape)
    shape[dim] = size
    value = torch.full(shape, old.detach().mean().item(), dtype=old.dtype, device=old.device)
    value.index_copy_(dim, index.to(old.device), old.detach())
    setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad) if _is_param(old) else value)


def _register_present(paths: Sequence[str], handler: ChannelHandler, used_for: str) -> None:
    """``handler`` for each of the timm/torchvision classes ``paths`` names that exists (the rest are recorded)."""
    for cls in optional_imports(*paths, used_for=f"channel handler: {used_for}"):
        register_channel_handler(cls, handler, used_for)


BUILT_IN: List[Tuple[type, ChannelHandler, str]] = [
    (nn.modules.conv._ConvNd, ConvHandler(), "Conv1d/2d/3d, transposed, and subclasses"),
    (nn.Linear, LinearHandler(), "heads, channels-last MLPs"),
    (nn.modules.batchnorm._NormBase, ChannelwiseHandler("num_features"), "BatchNorm*, InstanceNorm*"),
    (nn.GroupNorm, GroupNormHandler("num_channels", "num_groups"), "statistics over channel groups"),
    (nn.LayerNorm, ChannelwiseHandler("normalized_shape", True, axis=-1), "channels-last (ConvNeXt blocks)"),
    (nn.MultiheadAttention, MultiheadAttentionHandler(), "self-attention: whole heads"),
]
for _type, _handler, _reason in BUILT_IN:
    register_channel_handler(_type, _handler, _reason)

_register_present(
    [
        "timm.layers:StdConv2d",
        "timm.layers:StdConv2dSame",
        "timm.layers:ScaledStdConv2d",
        "timm.layers:ScaledStdConv2dSame",
    ],
    ConvHandler(channels_normalised=True),
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
    ChannelwiseHandler("normalized_shape", True, axis=1),
    "LayerNorms over dim 1 of NCHW (ConvNeXt stem and downsampling, MaxxViT; some subclass nn.LayerNorm)",
)
_register_present(
    ["timm.layers:RmsNorm", "timm.layers:RmsNormFp32", "timm.layers:SimpleNorm", "timm.layers:SimpleNormFp32"],
    ChannelwiseHandler("normalized_shape", True, axis=-1),
    "RMS norms over the last dim (plain nn.Modules)",
)
_register_present(
    ["timm.layers:RmsNorm2d", "timm.layers:RmsNorm2dFp32", "timm.layers:SimpleNorm2d", "timm.layers:SimpleNorm2dFp32"],
    ChannelwiseHandler("normalized_shape", True, axis=1),
    "RMS norms over dim 1 of NCHW",
)
_register_present(
    ["timm.layers:BlurPool2d"], ChannelwiseHandler("channels"), "anti-aliasing: one blur filter per channel"
)
_register_present(
    ["timm.layers:EvoNorm2dS0", "timm.layers:EvoNorm2dS1", "timm.layers:EvoNorm2dS2"],
    GroupNormHandler("weight", "groups"),
    "EvoNorm S (and their 'a' subclasses): group statistics, no width attribute",
)
_register_present(["timm.layers:CondConv2d"], CondConvHandler(), "CondConv's experts, flattened")
