"""``kapify.convert``: put KAP (or KMP) and Gaussian noise after every convolution of a model.

Three steps apart: :func:`analyse` (a re-widened, arranged copy, its channel graph and width plan, and the convs
it runs), :func:`plan_conversion` (plain data: per conv the sheet, spare filters, multiplier, pool, noise and
where the pool runs; why widths stayed; the :class:`KapConfig` record) and :func:`apply_plan` (the only step that
changes the copy). ``kapify.load`` replays a stored plan through :func:`apply_plan` without tracing again.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Literal, Optional

import torch
from torch import nn

from ..layers import ChannelGrid, GaussianNoise
from ..layers.input_stage import add_input_stage, move_input_stages
from ..model_source import describe_source
from .arrange import arrange_channels
from .config import CONFIG_ATTR, INPUT_NOISE_ATTR, KapConfig, is_converted
from .conv_sites import ConvSites, find_conv_sites
from .conv_types import conv_types
from .conversion_plan import GRID_RULES, IMPLS, POOLS, ConvertOptions, LayerPlan, PatternArg, plan_layers
from .handlers import resize_layer
from .kap_conv import attach_kap, set_blend
from .optional import warn_skipped_once
from .rewiden import RewidenError, Widened, replay_widths, widen, width_record
from .tracing import example_input_shape
from .width_plan import why_not_square

__all__ = ["convert", "analyse", "plan_conversion", "apply_plan", "replay", "Analysis", "ConversionPlan", "GRID_RULES"]
__all__ += ["POOLS", "IMPLS"]


@dataclass
class Analysis:
    """What :func:`analyse` found: the copy to convert (re-widened to squares and arranged where asked), the
    re-widening (None: not asked, or failed: ``unwidened`` says why), the convs the copy runs, and per arranged
    conv its neighbour similarity [before, after]."""

    model: nn.Module
    widened: Optional[Widened]
    unwidened: Optional[str]
    sites: ConvSites
    similarity: Dict[str, List[float]]


@dataclass
class ConversionPlan:
    """Plain data: the options, one :class:`LayerPlan` per conv, the module that reads the input (where the input
    stages go) and the :class:`KapConfig` that records it all."""

    options: ConvertOptions
    layers: List[LayerPlan]
    entry: Optional[str]
    config: KapConfig


def _widen_to_squares(
    model: nn.Module, example_input: Optional[torch.Tensor], leaf_modules: Iterable[type]
) -> tuple[nn.Module, Optional[Widened], Optional[str]]:
    """Re-widen for grid="square": every free group, channel-normalised ones too; if the widened model
    no longer runs, without the channel-normalised groups (a stream width read at run time, e.g. MaxViT's
    attention); if that fails too, nothing (rectangular grids, with a warning)."""
    for widen_normalised in (True, False):
        try:
            widened = widen(model, "square", True, example_input, leaf_modules, widen_normalised=widen_normalised)
            return widened.model, widened, None
        except RewidenError as err:
            failure = err
    warnings.warn(f"grid='square' falls back to rectangular grids with the original widths: {failure}", stacklevel=4)
    return copy.deepcopy(model), None, str(failure)


def analyse(
    model: nn.Module, options: ConvertOptions, example_input: Optional[torch.Tensor], leaf_modules: Iterable[type]
) -> Analysis:
    """Step 1: a copy of ``model`` re-widened (``options.square_sheets``) and arranged (``options.arrange``), and
    the convs it runs; ``model`` itself is not changed."""
    if options.square_sheets:
        new, widened, unwidened = _widen_to_squares(model, example_input, leaf_modules)
    else:
        new, widened, unwidened = copy.deepcopy(model), None, None
    similarity: Dict[str, List[float]] = {}
    if options.arrange is not None and options.pool is not None:  # same widths: the graph stays valid
        arrange_grid = "line" if options.grid == "line" else "rect"
        new, arranged = arrange_channels(new, options.arrange, example_input, leaf_modules, grid=arrange_grid)
        similarity = {name: [r.before, r.after] for r in arranged for name in r.producers}
    inputs, eager = None if example_input is None else [example_input], None
    if widened is not None and options.arrange is None:  # the forward that checked the widened model
        inputs, eager = [widened.checked[0]], widened.checked[1]
    sites = find_conv_sites(new, tuple(leaf_modules), inputs, eager=eager)
    if sites.functional:
        warnings.warn(
            f"{len(sites.functional)} functional convolution(s) have no conv module to pool after and are left "
            f"as they are: {', '.join(sites.functional[:5])}",
            stacklevel=3,
        )
    return Analysis(new, widened, unwidened, sites, similarity)


def _width_notes(found: Analysis, names: Iterable[str]) -> tuple[Dict[str, str], List[str]]:
    """grid="square": why each non-square conv kept its width; the convs widened across a LayerNorm/GroupNorm."""
    fixed, across_norm, widened = {}, [], found.widened
    for name in names:
        channels = found.model.get_submodule(name).out_channels
        segments = [] if widened is None else [widened.graph.groups[g] for g in widened.graph.output_layout(name)]
        if any(g.normalised for g in segments) and channels != sum(g.width for g in segments):
            across_norm.append(name)
        if math.isqrt(channels) ** 2 == channels:
            continue
        if found.unwidened is not None:
            fixed[name] = "re-widening failed for this model: " + found.unwidened[:120]
        elif widened is not None:
            fixed[name] = why_not_square(widened.graph, widened.plan, name)
    return fixed, across_norm


def plan_conversion(
    model: nn.Module, found: Analysis, options: ConvertOptions, example_input: Optional[torch.Tensor] = None
) -> ConversionPlan:
    """Step 2: what to put after each conv ``options`` selects in ``found.model`` (read, not changed), recorded."""
    chosen = {name: route for name, route in found.sites.modules.items() if options.selects(name)}
    if not chosen:
        raise ValueError(
            f"include={options.include} / exclude={options.exclude} leave none of the {len(found.sites.modules)} "
            f"convolutions to convert (e.g. {', '.join(list(found.sites.modules)[:3])}); loosen the patterns"
        )
    layers = plan_layers(found.model, chosen, options)
    for layer in layers:
        layer.record.neighbour_similarity = found.similarity.get(layer.name)
    fixed_widths, across_norm = _width_notes(found, chosen) if found.widened or found.unwidened else ({}, [])
    config = KapConfig(
        **{**dataclasses.asdict(options), "input_noise": bool(options.input_noise and options.sigma > 0)},
        layers=[layer.record for layer in layers],
        skipped=found.sites.functional,
        params_before=sum(p.numel() for p in model.parameters()),
        source=describe_source(model, in_chans=_input_channels(model, example_input)),
        fixed_widths=fixed_widths,
        widened_across_norm=across_norm,
        input_shape=None if example_input is None else [1, *example_input.shape[1:]],
        plan={"widths": width_record(found.widened) if found.widened else None, "entry": found.sites.entry},
    )
    return ConversionPlan(options, layers, found.sites.entry, config)


def _multiply_filters(conv: nn.Module, sheet: ChannelGrid, wide: ChannelGrid, stride: int) -> None:
    """Give ``conv`` the ``wide`` grid's filters, old filter (r, c) at the centre (r*S, c*S) of the window that
    pools back to channel (r, c); the new filters get the layer's own initialisation."""
    rows, cols = torch.meshgrid(torch.arange(sheet.rows), torch.arange(sheet.cols), indexing="ij")
    centres = (rows * (1 if sheet.is_line else stride) * wide.cols + cols * stride).flatten()
    resize_layer(conv, new_out=wide.channels, out_index=centres)


def _apply_layer(conv: nn.Module, layer: LayerPlan, options: ConvertOptions) -> None:
    """Spare filters (the old ones first, a full square sheet whose pool passes on the first C), the kernel-size
    multiplier (S*S x the filters, pooled back to C with stride S), then the pool and noise."""
    record, keep = layer.record, None
    if layer.spare:
        keep = conv.out_channels
        resize_layer(conv, new_out=layer.sheet.channels, out_index=torch.arange(keep))
    if record.stride > 1:
        _multiply_filters(conv, layer.sheet, layer.grid, record.stride)
    pool_cls = POOLS[options.pool]
    grid = None if options.grid == "line" else layer.grid
    pool = None if pool_cls is None else pool_cls(options.k, record.stride, grid, keep)
    noise = GaussianNoise(options.sigma) if options.sigma > 0 else None
    if pool is not None or noise is not None:
        attach_kap(conv, pool, noise, record.impl)


def apply_plan(model: nn.Module, plan: ConversionPlan) -> nn.Module:
    """Step 3: carry ``plan`` out on ``model`` in place (pools, noise, input stages, the record); returns it."""
    options = plan.options
    for layer in plan.layers:
        _apply_layer(model.get_submodule(layer.name), layer, options)
    if options.input_noise and options.sigma > 0:  # first: the noise lives in pixel space, before normalisation
        add_input_stage(model, INPUT_NOISE_ATTR, GaussianNoise(options.sigma, site="input"), first=True)
    if plan.entry is not None:  # input stages on the module that reads the input: every entry point runs them
        move_input_stages(model, plan.entry)
    setattr(model, CONFIG_ATTR, plan.config)
    if options.blend != 1.0:
        set_blend(model, options.blend)
    return model


def _check_model(model: nn.Module) -> None:
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


def _warn_oversized(plan: ConversionPlan) -> None:
    oversized = [f"{layer.name} ({layer.grid})" for layer in plan.layers if layer.oversized]
    if oversized:
        warnings.warn(
            f"k={plan.options.k} is larger than the channel grid of {len(oversized)} conv(s), e.g. "
            f"{', '.join(oversized[:3])}: each pool averages every channel of the layer; pick k <= the grid's side",
            stacklevel=3,
        )


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

    ``model`` is never modified, also when conversion fails. ``k``: pooling window (odd), K channels on a
    line, K x K on a grid. ``sigma``: std of the noise after each pool and on the input, in training (0: no
    noise). ``pool``: "avg" (KAP), "max" (KMP) or None (noise only, the NT(sigma) baseline). ``stride``: S > 1
    is the kernel-size multiplier (§4.2): S*S x the filters, pooled back to C channels. ``grid``: "square"
    (re-widen every free channel group to a perfect square first, 128 -> 144 = 12x12, keeping the function;
    a fixed ungrouped width gets spare filters), "rect" (128 -> 8x16, pretrained shapes kept) or "line" (1-D).
    ``impl``: where an average pool runs: "weight" (the conv's filters, Eq. 3), "activation" or "auto"
    (whichever is smaller per call). ``include`` / ``exclude``: fnmatch patterns on conv names.
    ``leaf_modules``: module types FX must not trace through. ``example_input``: checks the traced graph
    (default: from timm's ``pretrained_cfg``, else 224x224). ``blend``: (1 - blend) conv + blend KAP, a
    warm start for trained models (:func:`kapify.set_blend`). ``arrange="similarity"``: make similar
    filters grid neighbours first (:func:`kapify.arrange_channels`).

    Example:
        >>> import timm, kapify
        >>> kap = kapify.convert(timm.create_model("resnet18"), k=3, sigma=0.1)
        >>> kap.conv1.kap_pool
        KernelAvgPool(kernel_size=3, stride=1, grid=8x8)
    """
    given = locals()
    options = ConvertOptions.checked(**{name: given[name] for name in ConvertOptions.names()})
    warn_skipped_once()
    _check_model(model)
    found = analyse(model, options, example_input, leaf_modules)
    plan = plan_conversion(model, found, options, example_input)
    _warn_oversized(plan)
    return apply_plan(found.model, plan)


def _input_channels(model: nn.Module, example_input: Optional[torch.Tensor]) -> Optional[int]:
    """The channels of the image the model was traced on (dim 1 of a batch of images), else None."""
    if example_input is None:
        shape = example_input_shape(model)
        return shape[0] if len(shape) >= 2 else None
    return example_input.shape[1] if isinstance(example_input, torch.Tensor) and example_input.dim() >= 3 else None


def replay(model: nn.Module, config: KapConfig, inplace: bool = False) -> nn.Module:
    """A converted copy of ``model`` (``model`` itself with ``inplace``) as ``config`` records it, from its stored
    plan, without tracing (what :func:`kapify.load` does): the widths re-applied, each recorded conv planned again
    and the plan applied. The record it gets holds the layers as planned now, to compare with ``config.layers``."""
    if config.plan is None:
        raise ValueError(f"this record (version {config.version}) has no stored plan; convert the model again")
    options = ConvertOptions.of(config)
    widths = config.plan.get("widths")
    if widths is not None:
        new = replay_widths(model, widths, inplace)
    else:
        new = model if inplace else copy.deepcopy(model)
    layers = plan_layers(new, {r.name: r.route for r in config.layers}, options)
    for layer, stored in zip(layers, config.layers):
        layer.record.neighbour_similarity = stored.neighbour_similarity
    record = dataclasses.replace(  # the model is built unfolded; load folds it after
        copy.deepcopy(config), layers=[layer.record for layer in layers], folded=False
    )
    return apply_plan(new, ConversionPlan(options, layers, config.plan.get("entry"), record))
