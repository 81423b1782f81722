"""Robustness evaluation: attacks (PGD, AutoAttack, Square), trust checks, transfer, noise
sensitivity, randomized-smoothing certification, diagnostics and the ``kapify-eval`` command."""

from .attacks import ATTACKS, AttackSpec, register_attack
from .certify import certified_accuracy, certify
from .checks import AdversarialExampleError, masking_flags, verify_examples
from .evaluate import attack_mode, evaluate
from .harness import EvalConfig, run_evaluation

__all__ = [
    "ATTACKS",
    "AdversarialExampleError",
    "AttackSpec",
    "EvalConfig",
    "attack_mode",
    "certified_accuracy",
    "certify",
    "evaluate",
    "masking_flags",
    "register_attack",
    "run_evaluation",
    "verify_examples",
]
