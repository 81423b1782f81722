"""The conversion plan: what :func:`kapify.convert` puts after each conv, as plain data.

:class:`ConvertOptions` holds a call's options, checked once. :func:`plan_layers` reads the (re-widened) model's
convs and decides, per conv, the channel sheet its pool runs on, spare filters or the kernel-size multiplier, the
pool's stride and where it runs; it changes nothing. :func:`kapify.surgery.convert.apply_plan` carries it out.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Union

from torch import nn

from ..layers import ChannelGrid, KernelAvgPool, KernelMaxPool, check_kernel_size, check_sigma, check_stride
from ..layers.grid import line_grid, rect_grid
from .arrange import ARRANGE_METHODS
from .config import KapConfig, LayerRecord
from .kap_conv import original_class, plain_ungrouped

__all__ = ["ConvertOptions", "GRID_RULES", "IMPLS", "LayerPlan", "POOLS", "PatternArg", "plan_layer", "plan_layers"]

#: channel-layout rules by name: C -> grid.
GRID_RULES: Dict[str, Callable[[int], ChannelGrid]] = {
    "rect": rect_grid,  # most nearly square rows x cols factorisation of C (keeps pretrained shapes)
    "line": line_grid,  # 1-D KAP over the channel index
    "square": rect_grid,  # the widths are squares after re-widening; where one is fixed, an ungrouped conv gets
    # spare filters to fill a square sheet, others keep the rectangle
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


@dataclass(frozen=True)
class ConvertOptions:
    """The options of one :func:`kapify.convert` call (see its docstring), checked by :meth:`checked`: the one list
    of them. ``convert``'s keyword arguments and :class:`KapConfig`'s fields of the same names are checked against
    it (tests/surgery/test_conversion_steps.py)."""

    k: int = 3
    sigma: float = 0.1
    pool: Optional[str] = "avg"
    stride: int = 1
    grid: str = "square"
    input_noise: bool = True
    impl: str = "auto"
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    blend: float = 1.0
    arrange: Optional[str] = None

    @classmethod
    def checked(cls, include: PatternArg = None, exclude: PatternArg = None, **options) -> "ConvertOptions":
        """The options, validated: a bad one raises ``ValueError`` naming it and the accepted values."""
        opts = cls(include=_patterns(include, "include"), exclude=_patterns(exclude, "exclude"), **options)
        check_kernel_size(opts.k)
        if opts.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {opts.impl!r}")
        sigma = check_sigma(opts.sigma)
        if opts.pool not in POOLS:
            raise ValueError(f"pool must be 'avg' (KAP), 'max' (KMP) or None (noise only), got {opts.pool!r}")
        check_stride(opts.stride)
        if opts.stride > 1 and opts.pool is None:
            raise ValueError(f"stride={opts.stride} is a pooling stride; it needs pool='avg' or 'max'")
        if opts.grid not in GRID_RULES:
            raise ValueError(f"grid must be one of {sorted(GRID_RULES)}, got {opts.grid!r}")
        if opts.arrange is not None and opts.arrange not in ARRANGE_METHODS:
            raise ValueError(f"unknown arrange method {opts.arrange!r}; available: {list(ARRANGE_METHODS)} (or None)")
        if opts.blend != 1.0 and (opts.pool != "avg" or opts.stride != 1 or not 0.0 <= opts.blend <= 1.0):
            raise ValueError(
                f"blend (in [0, 1]) applies to average pooling with stride 1, got blend={opts.blend!r}, "
                f"pool={opts.pool!r}, stride={opts.stride}"
            )
        return cls(**{**opts.__dict__, "sigma": sigma})

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def of(cls, config: KapConfig) -> "ConvertOptions":
        """The options a conversion record holds, checked."""
        return cls.checked(**{name: getattr(config, name) for name in cls.names()})

    def selects(self, name: str) -> bool:
        """Whether the conv module ``name`` passes ``include`` / ``exclude``."""
        if self.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not (self.exclude and any(fnmatch.fnmatchcase(name, p) for p in self.exclude))

    @property
    def square_sheets(self) -> bool:
        """Whether channel groups are re-widened to squares first (grid="square" with a pool)."""
        return self.grid == "square" and self.pool is not None


@dataclass
class LayerPlan:
    """What goes after one conv: ``sheet``, the channel grid its pool runs on before the kernel-size
    multiplier; ``spare``, whether spare filters fill that sheet to a square; ``record``, the summary line
    (its ``grid``, ``stride`` and ``out_channels`` are the final ones)."""

    sheet: ChannelGrid
    spare: bool
    record: LayerRecord

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def grid(self) -> ChannelGrid:
        """The grid the pool runs on: the sheet, S*S x wider with the kernel-size multiplier (S x on a line)."""
        stride, sheet = self.record.stride, self.sheet
        if stride == 1:
            return sheet
        return (
            ChannelGrid(sheet.rows, sheet.cols * stride)
            if sheet.is_line
            else ChannelGrid(sheet.rows * stride, sheet.cols * stride)
        )

    @property
    def oversized(self) -> bool:
        """Whether every pooling window covers the whole grid (k >= 2 x its side - 1)."""
        side = max(self.grid.rows, self.grid.cols)
        return self.record.pool is not None and side >= 3 and self.record.kernel_size >= 2 * side - 1


def plan_layer(conv: nn.Module, name: str, route: str, options: ConvertOptions) -> LayerPlan:
    """The plan for conv ``name`` (found by ``route``) of the re-widened model; ``conv`` is only read."""
    channels, ungrouped = conv.out_channels, getattr(conv, "groups", 1) == 1
    sheet, spare = GRID_RULES[options.grid](channels), False
    if options.square_sheets and sheet.rows != sheet.cols and ungrouped:
        side = math.isqrt(channels - 1) + 1
        sheet, spare = ChannelGrid(side, side), True
    impl = options.impl
    if impl == "auto" and not (options.pool == "avg" and plain_ungrouped(conv)):
        impl = "activation"
    record = LayerRecord(
        name=name,
        conv_class=f"{original_class(conv).__module__}.{original_class(conv).__qualname__}",
        in_channels=conv.in_channels,
        out_channels=channels,
        pooled_channels=channels,  # spare filters pass on the first C; the multiplier's pool returns C
        grid=None,
        kernel_size=options.k,
        stride=options.stride if ungrouped else 1,  # grouped convs: no kernel-size multiplier
        pool=options.pool,
        sigma=options.sigma,
        route=route,
        impl=impl,
    )
    plan = LayerPlan(sheet, spare, record)
    if spare or record.stride > 1:
        record.out_channels = plan.grid.channels
    if options.pool is not None:
        record.grid = str(plan.grid)
    return plan


def plan_layers(model: nn.Module, convs: Dict[str, str], options: ConvertOptions) -> List[LayerPlan]:
    """One :class:`LayerPlan` per conv of ``convs`` (module name -> how it was found) in ``model``."""
    return [plan_layer(model.get_submodule(name), name, route, options) for name, route in convs.items()]
