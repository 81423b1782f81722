"""``kapify.convert``: put KAP (or KMP) and Gaussian noise after every convolution of a model."""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from typing import Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..layers import (
    ChannelGrid,
    GaussianNoise,
    KernelAvgPool,
    KernelMaxPool,
    check_kernel_size,
    check_sigma,
    check_stride,
)
from ..layers.grid import line_grid, rect_grid
from ..layers.input_stage import add_input_stage, move_input_stages
from ..model_source import describe_source
from .arrange import ARRANGE_METHODS, arrange_channels
from .channels import ChannelGraph
from .config import CONFIG_ATTR, KapConfig, LayerRecord, is_converted
from .conv_sites import find_conv_sites
from .conv_types import conv_types
from .kap_conv import attach_kap, original_class, set_blend, weight_poolable
from .optional import warn_skipped_once
from .resize import resize_layer
from .rewiden import Checked, RewidenError, _growth_limits, _rewiden

__all__ = ["convert", "GRID_RULES", "POOLS", "IMPLS", "INPUT_NOISE_ATTR"]

INPUT_NOISE_ATTR = "kapify_input_noise"

#: channel-layout rules by name: C -> grid.
GRID_RULES: Dict[str, Callable[[int], ChannelGrid]] = {
    "rect": rect_grid,  # most nearly square rows x cols factorisation of C (keeps pretrained shapes)
    "line": line_grid,  # 1-D KAP over the channel index
    "square": rect_grid,  # after kapify.rewiden(model, "square"): a perfect square; where a width is fixed,
    # an ungrouped conv gets spare filters to fill a square sheet (_add_spare_filters), others keep rect
}
#: pool modules by name (None: noise only).
POOLS = {"avg": KernelAvgPool, "max": KernelMaxPool, None: None}

#: where the pool runs; "auto" = on the weights wherever that is exact (avg pool after a plain ungrouped conv).
IMPLS = ("auto", "weight", "activation")

PatternArg = Union[str, Sequence[str], None]


def _patterns(arg: PatternArg, what: str) -> Optional[List[str]]:
    if arg is None:
        return None
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, (list, tuple)) and all(isinstance(p, str) for p in arg):
        return list(arg)
    raise ValueError(f"{what} takes module-name patterns (a string or a list of strings), got {arg!r}")


def _selected(name: str, include: Optional[List[str]], exclude: Optional[List[str]]) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def _widen_to_squares(
    model: nn.Module, example_input: Optional[torch.Tensor], leaf_modules: Iterable[type]
) -> Tuple[nn.Module, Optional[ChannelGraph], Optional[str], Optional[Checked]]:
    """Re-widen for grid="square": every free group, channel-normalised ones too; if the widened model
    no longer runs, without the channel-normalised groups (a stream width read at run time, e.g. MaxViT's
    attention); if that fails too, nothing (rectangular grids, with a warning). Returns the model, its
    channel graph, why it was not widened, and the forward that checked it."""
    try:
        new, graph, checked = _rewiden(
            model, "square", True, example_input, leaf_modules, strict=False, widen_normalised=True
        )
        return new, graph, None, checked
    except RewidenError:
        pass
    try:
        new, graph, checked = _rewiden(model, "square", True, example_input, leaf_modules, strict=False)
        return new, graph, None, checked
    except RewidenError as err:
        warnings.warn(f"grid='square' falls back to rectangular grids with the original widths: {err}", stacklevel=3)
        return copy.deepcopy(model), None, str(err), None


def _why_not_square(graph: ChannelGraph, name: str) -> str:
    """Why a conv's re-widened output is not a square number of channels."""
    layout = graph.output_layout(name)
    if not layout:
        return "not in the traced graph"
    stuck = next((graph.groups[g].fixed for g in layout if graph.groups[g].fixed), None)
    if stuck:
        return stuck
    multiplied = graph.multiplied.get(layout[0])
    if len(layout) == 1 and multiplied is not None:
        return f"widens with its input in whole groups or heads ({multiplied[2]} per {multiplied[1]} input channels)"
    if len(layout) > 1:
        widths = " + ".join(str(graph.groups[g].width) for g in layout)
        return f"its output is split into {len(layout)} segments ({widths} channels) whose widths other convs set"
    divisor = graph.groups[layout[0]].divisor
    return f"no square within {_growth_limits(graph)(layout)}x is a multiple of {divisor} (whole groups or heads)"


def _multiply_filters(conv: nn.Module, layout: ChannelGrid, stride: int) -> ChannelGrid:
    """Give ``conv`` stride*stride times its filters on a (rows*S) x (cols*S) grid (stride*C on a
    line), old filter (r, c) at the centre (r*S, c*S) of the window that pools back to channel (r, c);
    the new filters get the layer's own initialisation. A stride-S pool then returns C channels."""
    wide = (
        ChannelGrid(layout.rows, layout.cols * stride)
        if layout.is_line
        else ChannelGrid(layout.rows * stride, layout.cols * stride)
    )
    rows, cols = torch.meshgrid(torch.arange(layout.rows), torch.arange(layout.cols), indexing="ij")
    centres = (rows * (1 if layout.is_line else stride) * wide.cols + cols * stride).flatten()
    resize_layer(conv, new_out=wide.channels, out_index=centres)
    return wide


def _add_spare_filters(conv: nn.Module) -> ChannelGrid:
    """Give an ungrouped conv whose width is fixed at a non-square C the next square number of
    filters, the old ones first and the new ones with the layer's own initialisation: a full square
    sheet whose pool passes on the first C channels (the spare filters only join their neighbours' pools)."""
    side = math.isqrt(conv.out_channels - 1) + 1
    resize_layer(conv, new_out=side * side, out_index=torch.arange(conv.out_channels))
    return ChannelGrid(side, side)


def _check_options(k: int, sigma: float, pool: Optional[str], stride: int, grid: str, impl: str) -> float:
    check_kernel_size(k)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    sigma = check_sigma(sigma)
    if pool not in POOLS:
        raise ValueError(f"pool must be 'avg' (KAP), 'max' (KMP) or None (noise only), got {pool!r}")
    check_stride(stride)
    if stride > 1 and pool is None:
        raise ValueError(f"stride={stride} is a pooling stride; it needs pool='avg' or 'max'")
    if grid not in GRID_RULES:
        raise ValueError(f"grid must be one of {sorted(GRID_RULES)}, got {grid!r}")
    return sigma


def convert(
    model: nn.Module,
    k: int = 3,
    sigma: float = 0.1,
    pool: Optional[Literal["avg", "max"]] = "avg",
    stride: int = 1,
    grid: str = "square",
    input_noise: bool = True,
    impl: Literal["auto", "weight", "activation"] = "auto",
    include: PatternArg = None,
    exclude: PatternArg = None,
    leaf_modules: Iterable[type] = (),
    example_input: Optional[torch.Tensor] = None,
    blend: float = 1.0,
    arrange: Optional[str] = None,
) -> nn.Module:
    """Return a copy of ``model`` with a channel pool and Gaussian noise after every convolution.

    Args:
        model: any timm / torchvision / user CNN; it is never modified, also when conversion fails.
        k: pooling window (odd): K channels on a line, K x K on a grid.
        sigma: std of the N(0, sigma^2) noise added after each pool (and to the input) in training.
            0 adds no noise layers.
        pool: "avg" (KAP), "max" (KMP) or None (noise only: the paper's NT(sigma) baseline).
        stride: pooling stride. S > 1 is the paper's kernel-size multiplier (§4.2): each plain conv
            gets S*S times the filters (S times on a line) and the stride-S pool brings them back
            to C channels, so downstream layers keep their shapes (grouped convs keep stride 1).
        grid: channel layout: "rect" (most nearly square rows x cols, e.g. 128 -> 8x16; keeps
            pretrained shapes), "square" (first :func:`kapify.rewiden` every free channel group to
            a perfect square, 128 -> 144 = 12x12; new channels start with zero outgoing weights, so
            the function is kept, exactly unless a LayerNorm/GroupNorm sees them; fixed groups stay rect)
            or "line" (1-D KAP).
        input_noise: also add the noise to the model's input (training only).
        impl: where an average pool runs: "weight" pools the conv's filters (Eq. 3; only after plain
            ungrouped convs), "activation" pools the output, "auto" (where "weight" applies) pools
            whichever of the two is smaller in each call. Outputs and gradients agree either way.
        include / exclude: fnmatch patterns on conv module names, e.g. ``exclude="conv1"``.
        leaf_modules: extra module types FX must not trace through (their convs are still converted).
        blend: KAP warm-start for trained models: each average pool computes (1 - blend) conv(x) +
            blend KAP(conv(x)); 0 starts from the trained function, ramp it to 1 with
            :func:`kapify.set_blend` while fine-tuning (recipes: ``--kap-warmup-epochs``).
        arrange: for trained models, "similarity" first permutes each coupled channel group so that
            similar filters are grid neighbours (:func:`kapify.arrange_channels`; the plain function is
            unchanged); ``summary`` shows each layer's neighbour similarity before and after.
        example_input: input used to check the traced graph against eager execution
            (default: from timm's ``pretrained_cfg``, else a 224x224 image).

    Example:
        >>> import timm, kapify
        >>> kap = kapify.convert(timm.create_model("resnet18"), k=3, sigma=0.1)
        >>> kap.conv1.kap_pool
        KernelAvgPool(kernel_size=3, stride=1, grid=8x8)
    """
    sigma = _check_options(k, sigma, pool, stride, grid, impl)
    warn_skipped_once()
    if arrange is not None and arrange not in ARRANGE_METHODS:
        raise ValueError(f"unknown arrange method {arrange!r}; available: {list(ARRANGE_METHODS)} (or None)")
    if blend != 1.0 and (pool != "avg" or stride != 1 or not 0.0 <= blend <= 1.0):
        raise ValueError(
            f"blend (in [0, 1]) applies to average pooling with stride 1, got blend={blend!r}, pool={pool!r}, "
            f"stride={stride}"
        )
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    if is_converted(model):
        raise ValueError(
            f"{type(model).__name__} was already converted by kapify (see kapify.summary(model)); "
            f"convert the original model instead of converting twice"
        )
    if not any(isinstance(m, conv_types()) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no convolution: KAP pools the output channels of convolutions. "
            f"If it has a custom conv layer, register it with kapify.register_conv_type(MyConv)"
        )
    params_before = sum(p.numel() for p in model.parameters())
    if grid == "square" and pool is not None:  # widen every free channel group to a perfect square, new channels silent
        new, graph, unwidened, checked = _widen_to_squares(model, example_input, leaf_modules)
    else:
        new, graph, unwidened, checked = copy.deepcopy(model), None, None, None
    similarity: Dict[str, List[float]] = {}
    if arrange is not None and pool is not None:  # permute before pooling: same widths, so graph stays valid
        new, arranged = arrange_channels(
            new, arrange, example_input, leaf_modules, grid="line" if grid == "line" else "rect"
        )
        similarity = {name: [r.before, r.after] for r in arranged for name in r.producers}
    inputs, eager = None if example_input is None else [example_input], None
    if checked is not None and arrange is None:  # compare the graph to the forward that checked the widened model
        inputs, eager = [checked[0]], checked[1]
    sites = find_conv_sites(new, tuple(leaf_modules), inputs, eager=eager)
    if sites.functional:
        warnings.warn(
            f"{len(sites.functional)} functional convolution(s) have no conv module to pool after and are left "
            f"as they are: {', '.join(sites.functional[:5])}",
            stacklevel=2,
        )
    chosen = {name: route for name, route in sites.modules.items() if _selected(name, include_p, exclude_p)}
    if not chosen:
        raise ValueError(
            f"include={include_p} / exclude={exclude_p} leave none of the {len(sites.modules)} convolutions "
            f"to convert (e.g. {', '.join(list(sites.modules)[:3])}); loosen the patterns"
        )
    records, fixed_widths, across_norm, oversized = [], {}, [], []
    for name, route in chosen.items():
        conv = new.get_submodule(name)
        segments = [graph.groups[g] for g in graph.output_layout(name)] if graph is not None else []
        if any(g.normalised for g in segments) and conv.out_channels != sum(g.width for g in segments):
            across_norm.append(name)
        if unwidened is not None and math.isqrt(conv.out_channels) ** 2 != conv.out_channels:
            fixed_widths[name] = "re-widening failed for this model: " + unwidened[:120]
        elif graph is not None and math.isqrt(conv.out_channels) ** 2 != conv.out_channels:
            fixed_widths[name] = _why_not_square(graph, name)
        layout, keep, ungrouped = GRID_RULES[grid](conv.out_channels), None, getattr(conv, "groups", 1) == 1
        if grid == "square" and pool is not None and layout.rows != layout.cols and ungrouped:
            keep, layout = conv.out_channels, _add_spare_filters(conv)
        layer_stride = stride if ungrouped else 1  # grouped convs: no kernel-size multiplier
        if layer_stride > 1:  # kernel-size multiplier (§4.2): S*S x the filters, pooled back to C channels
            layout = _multiply_filters(conv, layout, layer_stride)
        pool_module = None if pool is None else POOLS[pool](k, layer_stride, None if grid == "line" else layout, keep)
        side = max(layout.rows, layout.cols)
        if pool_module is not None and side >= 3 and k >= 2 * side - 1:  # every window covers the whole grid
            oversized.append(f"{name} ({layout})")
        noise = GaussianNoise(sigma) if sigma > 0 else None
        layer_impl = (
            impl if impl == "weight" or (impl == "auto" and weight_poolable(conv, pool_module)) else "activation"
        )
        records.append(
            LayerRecord(
                name=name,
                conv_class=f"{original_class(conv).__module__}.{original_class(conv).__qualname__}",
                in_channels=conv.in_channels,
                out_channels=conv.out_channels,
                pooled_channels=pool_module.out_channels(conv.out_channels)
                if pool_module is not None
                else conv.out_channels,
                grid=str(layout) if pool_module is not None else None,
                kernel_size=k,
                stride=layer_stride,
                pool=pool,
                sigma=sigma,
                route=route,
                impl=layer_impl,
                neighbour_similarity=similarity.get(name),
            )
        )
        if pool_module is not None or noise is not None:
            attach_kap(conv, pool_module, noise, layer_impl)
    if oversized:
        warnings.warn(
            f"k={k} is larger than the channel grid of {len(oversized)} conv(s), e.g. {', '.join(oversized[:3])}: "
            f"each pool averages every channel of the layer; pick k <= the grid's side",
            stacklevel=2,
        )
    if input_noise and sigma > 0:
        # first: the noise lives in pixel space, before any input normalisation
        add_input_stage(new, INPUT_NOISE_ATTR, GaussianNoise(sigma, site="input"), first=True)
    if sites.entry is not None:  # input stages on the module that reads the input: every entry point runs them
        move_input_stages(new, sites.entry)
    config = KapConfig(
        k=k,
        stride=stride,
        sigma=sigma,
        pool=pool,
        grid=grid,
        input_noise=bool(input_noise and sigma > 0),
        impl=impl,
        include=include_p,
        exclude=exclude_p,
        layers=records,
        skipped=sites.functional,
        params_before=params_before,
        source=describe_source(model),
        fixed_widths=fixed_widths,
        widened_across_norm=across_norm,
        arrange=arrange,
        input_shape=None if example_input is None else [1, *example_input.shape[1:]],
    )
    setattr(new, CONFIG_ATTR, config)
    if blend != 1.0:
        set_blend(new, blend)
    return new
