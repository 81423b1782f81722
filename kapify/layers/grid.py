"""Channel grids: how the C channels of a layer are laid out for pooling.

A :class:`ChannelGrid` is a ``rows x cols`` sheet filled row-major (channel ``r * cols + c``).
A 1-D line of channels is the grid ``1 x C``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ChannelGrid", "rect_grid", "line_grid", "ELONGATION_LIMIT"]

#: ``cols / rows`` above which a rectangular grid is reported as elongated by ``kapify.summary``.
ELONGATION_LIMIT = 4.0


@dataclass(frozen=True)
class ChannelGrid:
    """A ``rows x cols`` row-major layout of ``rows * cols`` channels.

    Example:
        >>> ChannelGrid(8, 16).channels
        128
    """

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if not (isinstance(self.rows, int) and isinstance(self.cols, int)) or self.rows < 1 or self.cols < 1:
            raise ValueError(f"a channel grid needs positive integer rows and cols, got {self.rows} x {self.cols}")

    @property
    def channels(self) -> int:
        return self.rows * self.cols

    @property
    def is_line(self) -> bool:
        return self.rows == 1

    @property
    def elongation(self) -> float:
        """``max(rows, cols) / min(rows, cols)``: 1.0 for a square."""
        return max(self.rows, self.cols) / min(self.rows, self.cols)

    def pooled(self, stride: int) -> "ChannelGrid":
        """The grid left after pooling with ``stride`` (a line keeps one row)."""
        rows = self.rows if self.is_line else math.ceil(self.rows / stride)
        return ChannelGrid(rows, math.ceil(self.cols / stride))

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @classmethod
    def parse(cls, text: str) -> "ChannelGrid":
        """The grid written as ``"ROWSxCOLS"`` (the form ``str()`` gives and summaries record).

        Example:
            >>> ChannelGrid.parse("8x16")
            ChannelGrid(rows=8, cols=16)
        """
        rows, sep, cols = str(text).partition("x")
        if not (sep and rows.isdigit() and cols.isdigit()):
            raise ValueError(f"a grid is written ROWSxCOLS, e.g. '8x16'; got {text!r}")
        return cls(int(rows), int(cols))


def rect_grid(channels: int) -> ChannelGrid:
    """The most nearly square ``rows x cols`` factorisation of ``channels`` (rows <= cols).

    Example:
        >>> rect_grid(128)
        ChannelGrid(rows=8, cols=16)
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    rows = math.isqrt(channels)
    while channels % rows:
        rows -= 1
    return ChannelGrid(rows, channels // rows)


def line_grid(channels: int) -> ChannelGrid:
    """All ``channels`` on one line (1-D KAP)."""
    return ChannelGrid(1, channels)
