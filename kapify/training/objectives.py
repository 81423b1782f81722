"""Training objectives by name: what one update minimises. Grown with :func:`register_objective`."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import pgd
from .config import TrainConfig

__all__ = ["OBJECTIVES", "register_objective", "Objective"]

#: ``fn(model, images, labels, cfg) -> (loss, logits on the images the loss saw)``
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, TrainConfig], Tuple[torch.Tensor, torch.Tensor]]
OBJECTIVES: Dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[Objective], Objective]:
    """Decorator adding a training objective under ``name`` (selected by ``--objective``)."""

    def decorator(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        return fn

    return decorator


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (no noise, BatchNorm running statistics) while an attack is crafted."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@register_objective("standard")  # NT, NT(sigma), KAP, KMP: plain cross-entropy (noise lives in the model)
def standard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing), logits


@register_objective("pgd_at")  # Madry et al. / Rice et al. (AT-ES with --early-stop): train on PGD examples
def pgd_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    with _frozen_eval(model):
        x_adv = pgd(model, x, y, cfg.attack_eps, cfg.attack_norm, steps=cfg.attack_steps)
    logits = model(x_adv)
    return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing), logits


@register_objective("trades")  # Zhang et al. 2019: CE(clean) + beta * KL(clean || adversarial)
def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    with _frozen_eval(model):
        with torch.no_grad():
            clean_prob = F.softmax(model(x).float(), dim=1)

        def kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="sum")

        x_start = x + 0.001 * torch.randn_like(x)  # TRADES starts next to x: the KL's gradient is 0 at x itself
        x_adv = pgd(
            model, x, clean_prob, cfg.attack_eps, cfg.attack_norm, steps=cfg.attack_steps, loss_fn=kl, x_init=x_start
        )
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    robust = F.kl_div(
        F.log_softmax(model(x_adv).float(), dim=1), F.softmax(logits.float(), dim=1), reduction="batchmean"
    )
    return loss + cfg.trades_beta * robust, logits
