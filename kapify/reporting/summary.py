"""``kapify.summary``: what a conversion placed after each convolution, as text and as data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from torch import nn

from ..layers.grid import ELONGATION_LIMIT, ChannelGrid
from ..surgery.config import KapConfig, get_config

__all__ = ["ModelSummary", "summary"]

_COLUMNS = (
    "name",
    "conv_class",
    "in_channels",
    "out_channels",
    "grid",
    "kernel_size",
    "stride",
    "pool",
    "impl",
    "sigma",
    "route",
)
_HEADERS = ("module", "conv", "in", "out", "grid", "K", "S", "pool", "runs on", "noise", "found")


def _grid_note(grid: str | None) -> str:
    if grid is None:
        return ""
    rows, cols = (int(v) for v in grid.split("x"))
    return " (elongated)" if ChannelGrid(rows, cols).elongation > ELONGATION_LIMIT else ""


@dataclass
class ModelSummary:
    """Per-conv rows and parameter counts; ``str()`` gives a table, :meth:`to_dict` the data."""

    model: str
    config: KapConfig
    params_after: int

    @property
    def params_before(self) -> int:
        return self.config.params_before

    @property
    def rows(self) -> List[Dict[str, Any]]:
        return [
            {c: getattr(layer, c) for c in _COLUMNS + ("pooled_channels", "neighbour_similarity")}
            for layer in self.config.layers
        ]

    @property
    def elongated(self) -> List[str]:
        """Names of layers whose channel grid is more than ``ELONGATION_LIMIT`` times longer than wide."""
        return [layer.name for layer in self.config.layers if _grid_note(layer.grid)]

    @property
    def spare_filters(self) -> List[str]:
        """Names of layers whose fixed non-square width C is pooled on a full square sheet with spare
        filters (the next square number of filters; the layer passes on the first C)."""
        return [
            layer.name
            for layer in self.config.layers
            if layer.grid and ChannelGrid.parse(layer.grid).pooled(layer.stride).channels > layer.pooled_channels
        ]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "options": {k: v for k, v in self.config.to_dict().items() if k not in ("layers", "skipped")},
            "layers": self.rows,
            "skipped_functional_convs": list(self.config.skipped),
            "elongated_grids": self.elongated,
            "fixed_widths": dict(self.config.fixed_widths),
            "spare_filters": self.spare_filters,
            "widened_across_norm": list(self.config.widened_across_norm),
            "params_before": self.params_before,
            "params_after": self.params_after,
        }

    def __str__(self) -> str:
        arranged = any(row.get("neighbour_similarity") for row in self.rows)
        columns = _COLUMNS + (("neighbour_similarity",) if arranged else ())
        table = [_HEADERS + (("neighbour sim.",) if arranged else ())]
        for row in self.rows:
            cells = dict(row, conv_class=row["conv_class"].rsplit(".", 1)[-1])
            cells["grid"] = (cells["grid"] or "-") + _grid_note(row["grid"])
            if row["pooled_channels"] != row["out_channels"]:  # spare filters or a kernel-size multiplier
                cells["out_channels"] = f"{row['out_channels']}->{row['pooled_channels']}"
            cells["pool"] = cells["pool"] or "-"
            cells["sigma"] = cells["sigma"] or "-"
            similarity = row.get("neighbour_similarity")
            cells["neighbour_similarity"] = f"{similarity[0]:.3f} -> {similarity[1]:.3f}" if similarity else "-"
            table.append(tuple(str(cells[c]) for c in columns))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        c = self.config
        lines += [
            "",
            f"{self.model}: {len(c.layers)} convolutions, pool={c.pool} k={c.k} stride={c.stride} grid={c.grid} "
            f"sigma={c.sigma} input_noise={c.input_noise}",
            f"parameters: {self.params_before:,} before, {self.params_after:,} after",
        ]
        if self.elongated:
            lines.append(
                f"note: {len(self.elongated)} layer(s) have elongated channel grids (e.g. a prime channel count): "
                f"{', '.join(self.elongated[:5])}"
            )
        spare = set(self.spare_filters)
        for kept, what in (
            (spare, "on a square sheet with spare filters"),
            (set(c.fixed_widths) - spare, "rectangular grid"),
        ):
            if kept:
                lines.append(
                    f"note: {len(kept)} layer(s) kept a non-square width ({what}): "
                    + "; ".join([f"{n} ({why})" for n, why in c.fixed_widths.items() if n in kept][:5])
                )
        if c.widened_across_norm:
            lines.append(
                f"note: {len(c.widened_across_norm)} layer(s) were re-widened across a LayerNorm/GroupNorm (e.g. "
                f"{', '.join(c.widened_across_norm[:3])}): the new channels enter its statistics, so a pretrained "
                f"model's outputs shift slightly; grid='rect' keeps them exactly"
            )
        if c.skipped:
            lines.append(f"not converted (functional convs): {', '.join(c.skipped)}")
        return "\n".join(lines)


def summary(model: nn.Module) -> ModelSummary:
    """Summarise a model returned by :func:`kapify.convert`.

    Example:
        >>> import timm, kapify
        >>> s = kapify.summary(kapify.convert(timm.create_model("resnet18"), grid="rect"))
        >>> s.rows[0]["grid"], s.rows[-1]["grid"], s.params_before == s.params_after
        ('8x8', '16x32', True)
    """
    config = get_config(model)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} was not converted by kapify.convert, so there is nothing to summarise"
        )
    return ModelSummary(type(model).__name__, config, sum(p.numel() for p in model.parameters()))
