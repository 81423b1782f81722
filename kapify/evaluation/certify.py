"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter 2019, CERTIFY)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch import nn
from tqdm import tqdm

__all__ = ["certify", "certified_accuracy"]


def _counts(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    n: int,
    batch_size: int,
    num_classes: int,
    generator: torch.Generator,
) -> torch.Tensor:
    counts = torch.zeros(num_classes, dtype=torch.long)
    remaining = n
    while remaining > 0:
        size = min(batch_size, remaining)
        noise = torch.randn((size,) + tuple(x.shape), generator=generator).to(x.device) * sigma
        with torch.no_grad():
            pred = model(x.unsqueeze(0) + noise).argmax(1)
        counts += torch.bincount(pred.cpu(), minlength=num_classes)
        remaining -= size
    return counts


def certify(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> List[Dict[str, Any]]:
    """CERTIFY each image: guess the top class from ``n0`` noisy copies, lower-bound its probability
    from ``n`` fresh copies (Clopper-Pearson, level ``alpha``); radius ``sigma * Phi^-1(pA)`` if
    ``pA > 1/2``, else abstain (radius -1). Returns one ``{label, prediction, radius, correct}`` per image.
    The model should be in eval mode with its own noise off (see :func:`attack_mode`)."""
    from scipy.stats import beta, norm

    if not sigma > 0:
        raise ValueError(f"certification needs sigma > 0, got {sigma}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        num_classes = model(images[:1].to(device)).shape[1]
    rows = []
    for x, y in tqdm(list(zip(images, labels)), desc=f"certify sigma={sigma}", disable=not progress, leave=False):
        x = x.to(device)
        guess = int(_counts(model, x, sigma, n0, batch_size, num_classes, generator).argmax())
        hits = int(_counts(model, x, sigma, n, batch_size, num_classes, generator)[guess])
        p_lower = beta.ppf(alpha, hits, n - hits + 1) if hits > 0 else 0.0
        radius = sigma * norm.ppf(p_lower) if p_lower > 0.5 else -1.0
        rows.append(
            {
                "label": int(y),
                "prediction": guess if radius >= 0 else -1,
                "radius": float(radius),
                "correct": bool(radius >= 0 and guess == int(y)),
            }
        )
    return rows


def certified_accuracy(rows: List[Dict[str, Any]], radii: Sequence[float]) -> List[float]:
    """Fraction of images certified correct with radius >= r, for each r."""
    return [sum(1 for r in rows if r["correct"] and r["radius"] >= t) / max(len(rows), 1) for t in radii]
