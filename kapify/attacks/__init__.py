"""White-box attacks in [0,1] pixel space, shared by adversarial training and the evaluation harness."""

from .pgd import NORMS, lp_norm, pgd, project

__all__ = ["NORMS", "lp_norm", "pgd", "project"]
