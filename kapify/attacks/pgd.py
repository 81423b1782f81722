"""Projected gradient descent (Madry et al. 2018) under an L2 or Linf budget, in [0,1] pixel space."""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORMS", "lp_norm", "project", "pgd"]

Norm = Literal["L2", "Linf"]
NORMS = ("L2", "Linf")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def lp_norm(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-example L2 or Linf norm of a batch of perturbations, shape (N,)."""
    _check_norm(norm)
    flat = delta.flatten(1)
    return flat.norm(p=2, dim=1) if norm == "L2" else flat.abs().amax(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` intersected with the [0,1] box."""
    delta = x_adv - x
    if norm == "L2":
        scale = (eps / lp_norm(delta, "L2").clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale.view(-1, *[1] * (x.dim() - 1))
    else:
        delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: Norm, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A uniform-radius point of the eps-ball (drawn on the CPU when a CPU ``generator`` is given)."""

    def draw(fn: Callable[..., torch.Tensor], *shape: int) -> torch.Tensor:
        if generator is None:
            return fn(*shape, device=x.device, dtype=x.dtype)
        return fn(*shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)

    shape = (-1,) + (1,) * (x.dim() - 1)
    if norm == "L2":
        direction = draw(torch.randn, *x.shape)
        radius = draw(torch.rand, x.shape[0]) * eps
        noise = direction / lp_norm(direction, "L2").clamp_min(1e-12).view(shape) * radius.view(shape)
    else:
        noise = (draw(torch.rand, *x.shape) * 2 - 1) * eps
    return project(x + noise, x, eps, norm)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: Norm = "L2",
    steps: int = 10,
    step_size: Optional[float] = None,
    random_start: bool = True,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    x_init: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Maximise ``loss_fn(model(x_adv), y)`` (default: summed cross-entropy) over the eps-ball.

    L2 steps move along the normalised gradient, Linf steps along its sign; every iterate is
    projected back onto the ball and the [0,1] box. ``step_size`` defaults to ``2.5 * eps / steps``.
    The start is ``x_init`` (projected) if given, else a random point of the ball (``random_start``), else ``x``.
    The model is used as it is (call ``model.eval()`` first for evaluation). Returns the final iterate.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> x_adv = pgd(model, x, y, eps=0.5, steps=5)
        >>> bool((lp_norm(x_adv - x, "L2") <= 0.5 + 1e-5).all())
        True
    """
    _check_norm(norm)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step = 2.5 * eps / steps if step_size is None else step_size
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction="sum"))
    x = x.detach()
    if x_init is not None:
        x_adv = project(x_init.detach(), x, eps, norm)
    else:
        x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
    shape = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if norm == "L2":
                grad = grad / lp_norm(grad, "L2").clamp_min(1e-12).view(shape)
            else:
                grad = grad.sign()
            x_adv = project(x_adv.detach() + step * grad, x, eps, norm)
    return x_adv.detach()
