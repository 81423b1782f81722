"""Training recipes: timm-style options, objectives (standard, PGD-AT, TRADES) and the resumable loop."""

from .config import TrainConfig, build_parser, parse_args
from .model import build_model, width_kwargs
from .objectives import OBJECTIVES, register_objective
from .trainer import main, train

__all__ = [
    "OBJECTIVES",
    "TrainConfig",
    "build_model",
    "build_parser",
    "main",
    "parse_args",
    "register_objective",
    "train",
    "width_kwargs",
]
