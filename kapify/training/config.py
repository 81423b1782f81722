"""Training options: one dataclass, exposed as command-line flags and YAML args files (timm's
``--config file.yaml`` convention: the file sets defaults, flags override)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .. import options
from ..options import option
from .compiling import COMPILE_MODES

__all__ = ["TrainConfig", "parse_args", "build_parser"]


_opt = option


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved with every checkpoint."""

    # model and data
    model: str = _opt("resnet18", "timm/torchvision model name, or kapify/small_convnet")
    model_kwargs: Dict[str, Any] = _opt({}, "extra keyword arguments for the model factory (YAML/JSON dict)")
    dataset: str = _opt("cifar10", "cifar10, cifar100, tinyimagenet or imagenet")
    data_dir: Optional[str] = _opt(None, "data folder (default: $KAPIFY_DATA_DIR or ./data)")
    download: bool = _opt(True, "download the dataset when absent (needs internet)")
    small_image: Optional[bool] = _opt(None, "3x3 stride-1 stem, no stem max-pool (default: on for 32x32 datasets)")
    width_mult: float = _opt(1.0, "channel width multiplier (timm ResNets and kapify/small_convnet)")
    train_samples: Optional[int] = _opt(None, "train on a seeded random subset of this size")
    val_samples: int = _opt(1000, "training images held out for validation (robust accuracy for early stopping)")
    test_samples: Optional[int] = _opt(None, "test images scored at the end (default: all)")
    # kapify
    pool: str = _opt(
        "avg", "channel pool: avg (KAP), max (KMP) or none (NT / NT(sigma))", choices=["avg", "max", "none"]
    )
    kap_k: int = _opt(3, "KAP kernel size (odd)")
    kap_stride: int = _opt(1, "KAP stride")
    grid: str = _opt("square", "channel layout: square (re-widen to perfect squares), rect (keep widths) or line")
    sigma: float = _opt(0.1, "std of the Gaussian noise on the input and after every pool, in training")
    input_noise: bool = _opt(True, "add the noise to the input too")
    kap_impl: str = _opt(
        "auto", "where an average pool runs: auto, weight or activation", choices=["auto", "weight", "activation"]
    )
    # starting from a trained model
    pretrained: bool = _opt(
        False, "start from timm/torchvision pretrained weights (needs them cached locally or the hub)"
    )
    initial_checkpoint: Optional[str] = _opt(
        None, "start from these weights: a kapify checkpoint or a plain state_dict of the same model"
    )
    arrange: Optional[str] = _opt(
        None, "permute channels so similar filters are KAP neighbours before converting (similarity)"
    )
    kap_warmup_epochs: float = _opt(0, "ramp the KAP blend from 0 (trained function) to 1 (KAP) over these epochs")
    # objective
    objective: str = _opt("standard", "standard (NT/KAP), pgd_at (Madry/Rice) or trades")
    attack_norm: str = _opt("L2", "threat model of adversarial training and validation", choices=["L2", "Linf"])
    attack_eps: float = _opt(0.5, "adversarial-training / validation radius (pixel space)")
    attack_steps: int = _opt(10, "PGD steps in adversarial training")
    trades_beta: float = _opt(6.0, "TRADES trade-off beta")
    early_stop: bool = _opt(False, "keep the epoch with the best robust validation accuracy (AT-ES)")
    val_attack_steps: int = _opt(0, "PGD steps for robust validation accuracy each epoch (0: clean validation only)")
    # optimisation (timm factories)
    epochs: int = _opt(100, "epochs")
    batch_size: int = _opt(128, "batch size per process")
    opt: str = _opt("sgd", "optimizer name for timm.optim.create_optimizer_v2")
    lr: float = _opt(0.1, "peak learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "weight decay")
    sched: str = _opt("cosine", "timm scheduler name (cosine, poly, step, multistep, ...)")
    sched_on_updates: bool = _opt(True, "step the schedule every update (else every epoch)")
    warmup_epochs: float = _opt(0, "linear warm-up epochs")
    warmup_lr: float = _opt(1e-5, "learning rate at the start of warm-up")
    min_lr: float = _opt(0.0, "final learning rate")
    decay_rate: float = _opt(0.1, "decay rate (step) or power (poly)")
    decay_milestones: List[int] = _opt([50, 75], "epochs where multistep decays")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy")
    grad_clip: Optional[float] = _opt(None, "clip the gradient norm to this value")
    ema_decay: float = _opt(0.0, "EMA of the weights (timm ModelEmaV3) with this decay; 0 = off")
    # engineering
    seed: int = _opt(0, "seed of weights, data order, augmentation and noise")
    device: str = _opt("auto", "auto (cuda if available), cuda or cpu")
    amp: str = _opt(
        "auto", "autocast dtype: auto (bf16 on cuda and on CPUs with AMX/AVX512-BF16, else fp32), bf16, fp16 or none"
    )
    channels_last: Optional[bool] = _opt(None, "channels_last memory format (default: on wherever bf16 runs)")
    compile: str = _opt(
        "auto",
        "torch.compile mode: auto (reduce-overhead on CUDA, eager on CPU), off, default, "
        "reduce-overhead, max-autotune or max-autotune-no-cudagraphs",
        choices=list(COMPILE_MODES),
    )
    sync_bn: bool = _opt(False, "synchronised BatchNorm across processes")
    loader: str = _opt(
        "auto",
        "auto (tensor for 32x32 datasets), tensor (uint8 images in memory / on the GPU, batch augmentation) or torch "
        "(DataLoader)",
        choices=["auto", "tensor", "torch"],
    )
    workers: int = _opt(2, "data loader worker processes (torch loader)")
    output: str = _opt("runs", "output root folder")
    experiment: Optional[str] = _opt(None, "run folder name under output (default: from model, dataset and options)")
    resume: str = _opt("auto", "auto: continue from <run>/last.pth if present; a path; or 'none'")
    checkpoint_every: int = _opt(0, "also checkpoint every N updates (0: at each epoch end)")
    max_steps: Optional[int] = _opt(None, "stop after this many updates in total (checkpoint saved)")
    log_every: int = _opt(50, "progress-bar refresh in updates")

    def run_name(self) -> str:
        """Default run folder name, e.g. ``cifar10-resnet18-kap-k3-s0.1-standard``."""
        pool = {"avg": "kap", "max": "kmp", "none": "nt"}[self.pool]
        return f"{self.dataset}-{self.model.replace('/', '_')}-{pool}-k{self.kap_k}-s{self.sigma:g}-{self.objective}"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: one ``--flag`` per :class:`TrainConfig` field, plus ``--config``."""
    return options.build_parser(TrainConfig, "Train timm/torchvision models with KAP (kapify) and their baselines")


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    """Parse ``argv``: defaults, then the ``--config`` YAML, then command-line flags.

    Example:
        >>> parse_args(["--model", "kapify/small_convnet", "--kap-k", "5"]).kap_k
        5
    """
    return options.parse_options(
        TrainConfig, argv, "Train timm/torchvision models with KAP (kapify) and their baselines"
    )
