"""Square channel counts: the widths that give KAP a true sqrt(C) x sqrt(C) grid."""

from __future__ import annotations

import math
import numbers
from typing import Optional

__all__ = ["MAX_GROWTH", "MAX_GROWTH_GROUPED", "aligned_square", "square_width"]

#: The most a channel group grows to reach a square: past this, it keeps its width and ``convert(grid="square")``
#: gives its ungrouped convs spare filters (ConViT-tiny's 192-channel stream, heads of 48: the least square of whole
#: heads, 576, would widen it 3x and its parameters 4.9x, for the one conv it has).
MAX_GROWTH = 2
#: The same for a group that a grouped or depthwise conv pools: spare filters cannot stand in there (they would need
#: inputs of their own), so it may grow further (XCiT-tiny's 192 channels, heads of 48, depthwise LPI convs: 576).
MAX_GROWTH_GROUPED = 4


def aligned_square(channels: int, align: int = 16, divisor: int = 1, max_growth: int = MAX_GROWTH) -> Optional[int]:
    """The least perfect square >= ``channels`` and within ``max_growth`` x that is a multiple of ``divisor`` and, from
    64 channels on, of ``align`` if one is (else of ``divisor`` alone), or None if there is none."""
    for step in dict.fromkeys((math.lcm(align if channels >= 64 else 1, divisor), divisor)):
        n = math.isqrt(channels - 1) + 1 if channels > 1 else 1
        while n * n <= max_growth * channels:
            if (n * n) % step == 0:
                return n * n
            n += 1
    return None


def square_width(channels: int, align: int = 16, divisor: int = 1, max_growth: int = MAX_GROWTH) -> int:
    """The next usable perfect square >= ``channels``: for 64 channels and more, a square that is a
    multiple of ``align`` (16: 144, 256, 576, ... tensor-core friendly); below 64 any square
    (25, 36, 49). ``divisor`` (grouped convs) must divide it too; if no such square is within ``max_growth`` x, a
    square that is a multiple of ``divisor`` alone, and if there is none either, the next multiple of
    ``divisor`` (a rectangular grid).

    Example:
        >>> [square_width(c) for c in (16, 24, 64, 128, 192, 256, 512)]
        [16, 25, 64, 144, 256, 256, 576]
    """
    if not isinstance(channels, numbers.Integral) or channels < 1:
        raise ValueError(f"square_width needs a positive whole number of channels, got {channels!r}")
    square = aligned_square(channels, align, divisor, max_growth)
    return square if square is not None else -(-channels // divisor) * divisor
