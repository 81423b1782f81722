"""Two models attacked on the same images, compared image by image: the paired difference in robust accuracy and
its 95% interval (a paired comparison is far tighter than two separate intervals: most images fall, or stand,
for both models)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

__all__ = ["PairedDifference", "paired_difference", "paired_rows", "read_per_image", "proportion_interval"]


@dataclass(frozen=True)
class PairedDifference:
    """``first`` − ``second`` over ``n`` shared images (fractions), with the images only one model kept."""

    first: float
    second: float
    difference: float
    ci95: Tuple[float, float]
    n: int
    first_only: int
    second_only: int

    def to_dict(self) -> Dict[str, object]:
        return {**asdict(self), "ci95": list(self.ci95)}


def paired_difference(first: Sequence[int], second: Sequence[int]) -> PairedDifference:
    """Mean of the per-image differences of two 0/1 sequences over the same images, with its 95% interval
    (normal approximation of the paired difference; fine for n >= 100).

    Example:
        >>> d = paired_difference([1, 1, 0, 1], [1, 0, 0, 0])
        >>> d.difference, d.first_only, d.second_only
        (0.5, 2, 0)
    """
    if len(first) != len(second) or not first:
        raise ValueError(f"paired results need the same non-zero number of images, got {len(first)} and {len(second)}")
    diffs = [int(a) - int(b) for a, b in zip(first, second)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return PairedDifference(
        sum(map(int, first)) / n, sum(map(int, second)) / n, mean, (mean - half, mean + half), n,
        diffs.count(1), diffs.count(-1),
    )  # fmt: skip


def proportion_interval(hits: int, n: int) -> Tuple[float, float]:
    """Wilson 95% interval of a proportion ``hits / n`` (one model's accuracy on n images).

    Example:
        >>> lo, hi = proportion_interval(50, 100)
        >>> round(lo, 3), round(hi, 3)
        (0.404, 0.596)
    """
    if n <= 0:
        raise ValueError(f"an interval needs n >= 1 images, got {n}")
    z, p = 1.96, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def read_per_image(path: Union[str, Path]) -> Dict[str, List[int]]:
    """The rows of a ``per_image.json`` written by ``kapify-eval`` ("autoattack eps=1" -> 0/1 per image)."""
    return json.loads(Path(path).read_text())["rows"]


def paired_rows(first: Dict[str, List[int]], second: Dict[str, List[int]]) -> Dict[str, PairedDifference]:
    """The paired difference for every row the two per-image results share on the same number of images."""
    return {
        row: paired_difference(first[row], second[row])
        for row in sorted(set(first) & set(second))
        if len(first[row]) == len(second[row]) and first[row]
    }
