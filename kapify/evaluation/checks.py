"""Trust checks: every adversarial example is verified before it counts, and result patterns that
suggest gradient masking are flagged."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from ..attacks import lp_norm

__all__ = ["AdversarialExampleError", "verify_examples", "masking_flags", "EPS_TOLERANCE"]

#: slack on the budget: float32 rounding of a projection onto the ball, nothing more.
EPS_TOLERANCE = 1e-4


class AdversarialExampleError(RuntimeError):
    """An attack returned an example outside the threat model; its number would be meaningless."""


def verify_examples(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str, attack: str) -> None:
    """Raise :class:`AdversarialExampleError` unless every ``x_adv`` has the shape of ``x``, pixels
    in [0, 1] and ``||x_adv - x|| <= eps`` (relative tolerance :data:`EPS_TOLERANCE`)."""
    if x_adv.shape != x.shape:
        raise AdversarialExampleError(
            f"{attack} returned examples of shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}"
        )
    if not torch.isfinite(x_adv).all():
        raise AdversarialExampleError(f"{attack} returned non-finite pixels")
    low, high = x_adv.min().item(), x_adv.max().item()
    if low < -1e-6 or high > 1 + 1e-6:
        raise AdversarialExampleError(f"{attack} returned pixels outside [0, 1] (min {low:.4g}, max {high:.4g})")
    norms = lp_norm((x_adv - x).float(), norm)
    worst = norms.max().item() if norms.numel() else 0.0
    if worst > eps * (1 + EPS_TOLERANCE) + 1e-6:
        bad = int((norms > eps * (1 + EPS_TOLERANCE) + 1e-6).sum())
        raise AdversarialExampleError(
            f"{attack}: {bad} example(s) exceed the {norm} budget eps={eps} (largest {worst:.6g})"
        )


def masking_flags(results: List[Dict[str, Any]], gap: float = 0.10) -> List[Dict[str, str]]:
    """Patterns in ``results`` (rows with attack, norm, eps, accuracy mean) that suggest the
    gradients are masked and the white-box numbers overstate robustness."""
    flags: List[Dict[str, str]] = []
    acc = {(r["attack"], r["norm"], r["eps"]): r["accuracy"]["mean"] for r in results}
    for (attack, norm, eps), value in acc.items():
        aa = acc.get(("autoattack", norm, eps))
        if attack == "pgd" and aa is not None and value - aa > gap:
            flags.append(
                {
                    "kind": "pgd_above_autoattack",
                    "message": f"PGD accuracy {value:.1%} is {value - aa:.1%} above AutoAttack's {aa:.1%} at "
                    f"{norm} eps={eps}: PGD alone overstates robustness (gradient masking); trust AutoAttack",
                }
            )
        white = [acc[k] for k in (("pgd", norm, eps),) if k in acc]
        if attack == "square" and white and value < min(white) - 0.02:
            flags.append(
                {
                    "kind": "black_box_beats_white_box",
                    "message": f"black-box Square ({value:.1%}) beats white-box PGD ({min(white):.1%}) at "
                    f"{norm} eps={eps}: the gradients are not informative",
                }
            )
    for attack in {a for a, _, _ in acc if a != "clean"}:
        for norm in {n for a, n, _ in acc if a == attack}:
            sweep = sorted((e, v) for (a, n, e), v in acc.items() if a == attack and n == norm)
            if len(sweep) >= 3:
                rises = [(e0, e1) for (e0, v0), (e1, v1) in zip(sweep, sweep[1:]) if v1 > v0 + 0.02]
                if rises:
                    flags.append(
                        {
                            "kind": "accuracy_rises_with_eps",
                            "message": f"{attack} {norm}: accuracy rises from eps={rises[0][0]} to eps={rises[0][1]}; "
                            f"a stronger attack can never do worse, so the attack is failing",
                        }
                    )
                if attack in ("pgd", "autoattack") and sweep[-1][1] > 0.10 and sweep[-1][0] >= 4 * sweep[0][0]:
                    flags.append(
                        {
                            "kind": "accuracy_not_falling_to_zero",
                            "message": f"{attack} {norm}: {sweep[-1][1]:.1%} accuracy remains at eps={sweep[-1][0]}; "
                            f"robust accuracy should fall towards 0 as eps grows under a white-box attack",
                        }
                    )
    return flags
