"""Attacks by name for the evaluation harness (all in [0,1] pixel space, model in eval mode).

Each entry is ``fn(model, x, y, spec, seed) -> (x_adv, notes)``; grow the registry with
:func:`register_attack`. ``notes`` carries what the attack reported (e.g. AutoAttack's own checks).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..attacks import pgd

__all__ = ["AttackSpec", "ATTACKS", "register_attack"]


@dataclass(frozen=True)
class AttackSpec:
    """Threat model and attack settings (paper Table A1 defaults: 100 PGD steps, 5000 Square queries)."""

    norm: str = "L2"
    eps: float = 1.0
    pgd_steps: int = 100
    pgd_step_size: Optional[float] = None  # default 2.5 * eps / steps
    pgd_random_start: bool = True
    square_queries: int = 5000
    num_classes: int = 10  # set by evaluate() from the model's logits


AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, AttackSpec, int], Tuple[torch.Tensor, List[str]]]
ATTACKS: Dict[str, AttackFn] = {}


def register_attack(name: str) -> Callable[[AttackFn], AttackFn]:
    """Decorator adding an attack under ``name`` (``--attacks name``)."""

    def decorator(fn: AttackFn) -> AttackFn:
        ATTACKS[name] = fn
        return fn

    return decorator


@register_attack("clean")  # no attack: clean accuracy
def clean(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, seed: int
) -> Tuple[torch.Tensor, List[str]]:
    return x, []


@register_attack("pgd")  # kapify's PGD (L2 or Linf), Table A1: 100 steps, random start
def pgd_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, seed: int
) -> Tuple[torch.Tensor, List[str]]:
    generator = torch.Generator().manual_seed(seed)
    x_adv = pgd(
        model,
        x,
        y,
        spec.eps,
        spec.norm,
        steps=spec.pgd_steps,
        step_size=spec.pgd_step_size,
        random_start=spec.pgd_random_start,
        generator=generator,
    )
    return x_adv, []


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _autoattack_messages() -> Iterator[List[str]]:
    """Collect what pyautoattack warns about (its randomness/range/gradient checks)."""
    handler, logger = _Collect(), logging.getLogger("auto-attack")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
    finally:
        logger.removeHandler(handler)
        handler.messages.extend(str(w.message) for w in caught)


def _run_pyautoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AttackSpec,
    seed: int,
    attacks: Optional[List[str]],
    version: str = "standard",
) -> Tuple[torch.Tensor, List[str]]:
    from pyautoattack import AutoAttack

    notes: List[str] = []
    if attacks is None and version == "standard" and spec.num_classes < 4:  # its targeted attacks need >= 4 classes
        attacks = ["apgd-ce", "square"]
        notes.append(f"standard AutoAttack needs >= 4 classes; ran apgd-ce + square on {spec.num_classes} classes")
    version = version if attacks is None else "custom"
    adversary = AutoAttack(
        model, attacks=attacks, device=x.device, eps=spec.eps, norm=spec.norm, seed=seed, version=version
    )
    adversary.square.n_queries = spec.square_queries
    for targeted in (adversary.apgd_targeted, adversary.fab):
        targeted.n_target_classes = min(targeted.n_target_classes, spec.num_classes - 1)
    with _autoattack_messages() as messages:
        x_adv, _ = adversary.run_standard_evaluation(
            x.contiguous(), y, batch_size=x.shape[0]
        )  # contiguous: its L2 APGD calls .view
    notes.extend(m for m in messages if "robust accuracy" not in m.lower())
    return x_adv.to(x.device), notes


@register_attack("autoattack")  # Croce & Hein standard: APGD-CE, APGD-T, FAB-T, Square (pyautoattack)
def autoattack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, seed: int
) -> Tuple[torch.Tensor, List[str]]:
    return _run_pyautoattack(model, x, y, spec, seed, None)


@register_attack(
    "autoattack-rand"
)  # AutoAttack's version for randomised defences: APGD-CE + APGD-DLR, EOT over 20 draws
def autoattack_rand(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, seed: int
) -> Tuple[torch.Tensor, List[str]]:
    return _run_pyautoattack(model, x, y, spec, seed, None, version="rand")


@register_attack("square")  # black-box Square attack alone (Andriushchenko et al.), 5000 queries
def square(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, seed: int
) -> Tuple[torch.Tensor, List[str]]:
    return _run_pyautoattack(model, x, y, spec, seed, ["square"])
