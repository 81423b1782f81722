"""The training loop behind ``recipes/train_timm.py``: timm's optimizer/scheduler/EMA factories,
kapify models, DDP through torchrun, resume from ``last.pth``, a per-epoch CSV log, and a final
``kapify.save`` checkpoint that ``kapify-eval`` loads as is."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .. import serialization
from ..attacks import pgd
from ..data import build_dataset, build_loader, dataset_info
from ..data.datasets import DatasetInfo
from ..data.loader import default_transform
from ..data.tensor_loader import TensorLoader, tensor_arrays
from ..distributed import DistEnv, all_reduce_sum, init_distributed, shutdown_distributed
from ..files import write_text_atomically
from ..heap import keep_freed_memory
from ..precision import Precision, resolve_precision
from ..surgery import set_blend
from ..surgery.arrange import ARRANGE_METHODS
from .checkpoint import load_state, rng_state, save_state, set_rng_state
from .compiling import compile_model, resolve_compile
from .config import TrainConfig, parse_args
from .model import build_model
from .objectives import OBJECTIVES

__all__ = ["Run", "finish", "main", "record_epoch", "save_checkpoint", "start", "train", "train_one_epoch", "validate"]

Loader = Union[DataLoader, TensorLoader]

LOG_FIELDS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc",
    "val_acc",
    "val_robust_acc",
    "epoch_time_s",
    "images_per_s",
    "precision",
    "memory_format",
    "kap_blend",
]


def _check(cfg: TrainConfig) -> None:
    """Options that cannot work, refused before anything is built."""
    dataset_info(cfg.dataset)
    if not isinstance(cfg.model_kwargs, dict):
        raise ValueError(
            f"model_kwargs must be a mapping such as '{{drop_rate: 0.1}}' (YAML; a space after each colon), got "
            f"{cfg.model_kwargs!r}"
        )
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; registered: {sorted(OBJECTIVES)}")
    if cfg.early_stop and cfg.val_attack_steps < 1:
        raise ValueError(
            "early_stop keeps the epoch with the best robust validation accuracy: set val_attack_steps >= 1"
        )
    if (cfg.early_stop or cfg.val_attack_steps) and cfg.val_samples < 1:
        raise ValueError("robust validation needs held-out images: set val_samples >= 1")
    if cfg.pool == "none" and cfg.kap_stride != 1:
        raise ValueError("kap_stride only applies with a pool (pool=avg or max)")
    if cfg.kap_warmup_epochs and (cfg.pool != "avg" or cfg.kap_stride != 1):
        raise ValueError("kap_warmup_epochs blends KAP with the plain conv: it needs pool=avg and kap_stride=1")
    if cfg.arrange not in (None, *ARRANGE_METHODS):
        raise ValueError(f"arrange must be one of {list(ARRANGE_METHODS)} (or unset), got {cfg.arrange!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    if cfg.amp not in ("auto", "bf16", "fp16", "none"):
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {cfg.amp!r}")
    resolve_compile(cfg.compile, torch.device("cpu"))  # a bad mode fails here
    if cfg.loader not in ("auto", "tensor", "torch"):
        raise ValueError(f"loader must be auto, tensor or torch, got {cfg.loader!r}")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _datasets(cfg: TrainConfig, env: DistEnv, device: torch.device) -> Tuple[Loader, Optional[Loader], Loader, str]:
    """Train loader (minus a held-out validation part of the training set), validation loader, test
    loader, and which kind of loader they are (``tensor``: in-memory uint8 images augmented per
    batch on ``device``; ``torch``: a ``DataLoader`` with per-image transforms)."""
    kind = cfg.loader if cfg.loader != "auto" else ("tensor" if dataset_info(cfg.dataset).image_size <= 32 else "torch")
    train_full = build_dataset(
        cfg.dataset, True, cfg.data_dir, default_transform(cfg.dataset, True), download=cfg.download
    )
    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    val_index, train_index = order[: cfg.val_samples], order[cfg.val_samples :]
    if cfg.train_samples is not None:
        train_index = train_index[: cfg.train_samples]
    test_set = build_dataset(
        cfg.dataset, False, cfg.data_dir, download=cfg.download, num_samples=cfg.test_samples, seed=cfg.seed
    )
    if kind == "tensor":
        try:
            images, labels = tensor_arrays(train_full)
            test_images, test_labels = tensor_arrays(test_set)
        except TypeError as err:
            raise ValueError(f"--loader tensor: {err}; use --loader torch") from None
        common = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device, rank=env.rank, world_size=env.world_size)
        train_index_t, val_index_t = (
            torch.tensor(train_index, dtype=torch.int64),
            torch.tensor(val_index, dtype=torch.int64),
        )
        train: Loader = TensorLoader(images[train_index_t], labels[train_index_t], train=True, **common)
        val: Optional[Loader] = (
            TensorLoader(images[val_index_t], labels[val_index_t], train=False, **common) if val_index else None
        )
        test: Loader = TensorLoader(test_images, test_labels, train=False, **common)
    else:
        held_out = copy.copy(train_full)  # same images, evaluation transform
        held_out.transform = default_transform(cfg.dataset, False)
        common = dict(
            batch_size=cfg.batch_size, seed=cfg.seed, num_workers=cfg.workers, rank=env.rank, world_size=env.world_size
        )
        train = build_loader(cfg.dataset, True, dataset=Subset(train_full, train_index), **common)
        val = build_loader(cfg.dataset, False, dataset=Subset(held_out, val_index), **common) if val_index else None
        test = build_loader(cfg.dataset, False, dataset=test_set, **common)
    if len(train) == 0:
        raise ValueError(f"{len(train_index)} training images make no full batch of {cfg.batch_size}: lower batch_size")
    return train, val, test, kind


@torch.no_grad()
def _accuracy(model: nn.Module, loader: Loader, device: torch.device, cfg: TrainConfig, attack: bool) -> float:
    """Clean (or PGD, when ``attack``) accuracy over the loader, summed over processes."""
    was_training = model.training
    model.eval()
    correct = total = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if attack:
            x = pgd(model, x, y, cfg.attack_eps, cfg.attack_norm, steps=cfg.val_attack_steps)
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    correct, total = all_reduce_sum([correct, total], device)
    return correct / max(total, 1)


class _CsvLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and not path.is_file():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_FIELDS)

    def write(self, row: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([row.get(k, "") for k in LOG_FIELDS])


def _batches(loader: Loader, epoch: int, skip: int, rng: Optional[Dict[str, Any]]) -> Iterator:
    """The epoch's batches from ``skip`` on. A resumed run restores the RNG where the interrupted
    run stood: before the loader starts (at an epoch boundary) or after (mid-epoch)."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip_batches(skip)
    if rng is not None and skip == 0:
        set_rng_state(rng)
    iterator = iter(loader)
    if rng is not None and skip > 0:
        set_rng_state(rng)
    return iterator


def _diverged(loss: float, step: int, run_dir: Path) -> str:
    return (
        f"the training loss became {loss} by update {step}; {run_dir / 'last.pth'} (if any) holds the last state "
        f"before it: "
        f"lower the learning rate or sigma, then rerun to resume from there (or --resume none to start over)"
    )


@dataclass
class Run:
    """One training run: what :func:`start` builds and the position :func:`train_one_epoch` advances (timm's
    train.py shape: set-up, train one epoch, validate, checkpoint, finish)."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    info: DatasetInfo
    run_dir: Path
    model: nn.Module  # the model itself: state_dict, EMA, saving
    train_model: nn.Module  # what the training forward runs (DDP and/or compiled around ``model``)
    optimizer: Any
    scheduler: Any
    ema: Optional[nn.Module]
    scaler: Optional[torch.amp.GradScaler]
    precision: Precision
    loaders: Tuple[Loader, Optional[Loader], Loader, str]  # train, validation, test, loader kind
    compile_mode: Optional[str] = None
    epoch: int = 0  # where the run stands: the epoch and batch to start from, updates so far
    skip: int = 0
    step: int = 0
    best: float = -1.0
    pending_rng: Optional[Dict[str, Any]] = None  # a resumed run's RNG state, restored with its first batch
    train_time: float = 0.0
    first_update_s: Optional[float] = None
    stopped: bool = False  # max_steps reached before the last epoch ended
    warmup_steps: int = 0  # updates of the KAP warm-start (blend 0 -> 1), from the full epoch's length

    def blend_at(self, update: int) -> float:
        """KAP warm-start: a function of the update count, so a resumed run continues it exactly."""
        return min(1.0, update / self.warmup_steps)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @property
    def extra(self) -> Dict[str, Any]:
        """What every saved model records about the run."""
        return {"args": dataclasses.asdict(self.cfg), "dataset": dataclasses.asdict(self.info)}

    def say(self, message: str) -> None:
        if self.env.is_main:
            print(message, file=sys.stderr)


def _optimizer_and_scheduler(cfg: TrainConfig, model: nn.Module, updates_per_epoch: int) -> Tuple[Any, Any]:
    import timm.optim
    import timm.scheduler

    optimizer = timm.optim.create_optimizer_v2(
        model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer,
        cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        decay_rate=cfg.decay_rate,
        decay_milestones=cfg.decay_milestones,
        step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler


def start(cfg: TrainConfig) -> Run:
    """Check the options, build model, data, optimizer, scheduler and EMA, resume from ``last.pth`` if there is one,
    and wrap the model for training (channels_last, SyncBN, DDP, compile)."""
    from timm.utils import ModelEmaV3

    _check(cfg)
    env, device = init_distributed(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    info = dataset_info(cfg.dataset)
    run_dir = Path(cfg.output) / (cfg.experiment or cfg.run_name())
    run_dir.mkdir(parents=True, exist_ok=True)
    _seed_all(cfg.seed)
    model = build_model(cfg, info).to(device)
    loaders = _datasets(cfg, env, device)
    precision = resolve_precision(cfg.amp, cfg.channels_last, device)
    optimizer, scheduler = _optimizer_and_scheduler(cfg, model, len(loaders[0]))
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
    run = Run(cfg, env, device, info, run_dir, model, model, optimizer, scheduler, ema, scaler, precision, loaders)
    if cfg.pool == "avg":  # before a resumed run skips batches: len() of the loader is then what is left
        run.warmup_steps = round(cfg.kap_warmup_epochs * len(loaders[0]))
    _resume(run)
    run.compile_mode = resolve_compile(cfg.compile, device, cfg.objective)
    run.say(
        f"training in {precision.describe()} on {device}, {loaders[3]} data loader, "
        f"{'compiled (' + run.compile_mode + ')' if run.compile_mode else 'eager'}"
    )
    if precision.channels_last:
        run.model = run.model.to(memory_format=torch.channels_last)
    if env.distributed and cfg.sync_bn:
        run.model = nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
    run.train_model = run.model
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        run.train_model = DistributedDataParallel(run.train_model, device_ids=ids)
    run.train_model = compile_model(run.train_model, run.compile_mode)
    return run


def _resume(run: Run) -> None:
    """Load ``--resume`` (``last.pth`` of the run folder by default) into the run, refusing another run's file."""
    cfg = run.cfg
    path = run.run_dir / "last.pth" if cfg.resume == "auto" else (None if cfg.resume == "none" else Path(cfg.resume))
    state = load_state(path) if path is not None else None
    if cfg.resume not in ("auto", "none") and state is None:
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint")
    if state is None:
        return
    for key in ("model", "model_kwargs", "dataset", "pool", "kap_k", "grid", "width_mult", "objective", "seed"):
        if state["config"].get(key) != getattr(cfg, key):
            raise ValueError(
                f"{path} belongs to a run with {key}={state['config'].get(key)!r}, not {getattr(cfg, key)!r}; "
                f"use another --experiment, or --resume none to start over"
            )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    if run.scaler is not None and state.get("scaler") is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.skip, run.step, run.best = state["epoch"], state["batch"], state["step"], state["best"]
    run.pending_rng, run.train_time = state["rng"], state.get("train_time", 0.0)
    run.say(f"resuming {run.run_dir} at epoch {run.epoch}, batch {run.skip} (update {run.step})")


def save_checkpoint(run: Run, epoch: int, batch: int, loss_total: float) -> None:
    """Save ``last.pth`` (the position: ``epoch``, ``batch``), unless the loss went non-finite since the last save:
    then that one is kept and the run stops with an error naming the update."""
    if not math.isfinite(loss_total):
        raise FloatingPointError(_diverged(loss_total, run.step, run.run_dir))
    if run.env.is_main:
        save_state(
            run.run_dir / "last.pth",
            {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "ema": run.ema.state_dict() if run.ema is not None else None,
                "scaler": run.scaler.state_dict() if run.scaler else None,
                "epoch": epoch,
                "batch": batch,
                "step": run.step,
                "best": run.best,
                "rng": rng_state(),
                "train_time": run.train_time,
                "config": dataclasses.asdict(run.cfg),
            },
        )


def _update(run: Run, x: torch.Tensor, y: torch.Tensor, t0: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on the batch (x, y): the loss and logits."""
    cfg, device, amp_dtype = run.cfg, run.device, run.precision.dtype
    if run.warmup_steps:
        set_blend(run.model, run.blend_at(run.step))
    if run.compile_mode in ("reduce-overhead", "max-autotune"):  # CUDA graphs may overwrite the last step's outputs
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
        loss, logits = OBJECTIVES[cfg.objective](run.train_model, x, y, cfg)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.step += 1
    if run.first_update_s is None:  # this process's first update: compilation (if any) included
        if device.type == "cuda":
            torch.cuda.synchronize()
        run.first_update_s = time.perf_counter() - t0
    if run.ema is not None:
        run.ema.update(run.model, step=run.step)
    if cfg.sched_on_updates:
        run.scheduler.step_update(num_updates=run.step)
    return loss, logits


def train_one_epoch(run: Run, epoch: int) -> Dict[str, Any]:
    """Train epoch ``epoch`` from the run's position; its loss, accuracy, images and time (this process). Sets
    ``run.stopped`` when ``max_steps`` ends it early (``last.pth`` then holds the position)."""
    cfg, device = run.cfg, run.device
    run.model.train()
    train_loader = run.loaders[0]
    batches = _batches(train_loader, epoch, run.skip, run.pending_rng)
    run.pending_rng, first, remaining = None, run.skip, len(train_loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(batches, total=remaining, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.env.is_main,
               dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    for batch_index, (x, y) in enumerate(bar, start=first):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if run.precision.channels_last:
            x = x.to(memory_format=torch.channels_last)
        loss, logits = _update(run, x, y, t0)
        loss_sum += loss.detach() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        if run.step % max(cfg.log_every, 1) == 0 or batch_index + 1 == first + remaining:
            mean_loss = loss_sum.item() / seen  # one device sync per log interval, not per update
            if not math.isfinite(mean_loss):
                raise FloatingPointError(_diverged(mean_loss, run.step, run.run_dir))
            lr = run.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{correct.item() / seen:.3f}", lr=f"{lr:.3g}")
        if cfg.max_steps is not None and run.step >= cfg.max_steps:
            run.stopped = batch_index + 1 < first + remaining
            if run.stopped:
                save_checkpoint(run, epoch, batch_index + 1, loss_sum.item())
            break
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            save_checkpoint(run, epoch, batch_index + 1, loss_sum.item())
    bar.close()
    run.skip = 0
    return {"loss_sum": loss_sum.item(), "correct": correct.item(), "seen": seen, "time": time.perf_counter() - t0}


def validate(run: Run, epoch: int, stats: Dict[str, Any]) -> Tuple[Dict[str, Any], float]:
    """After epoch ``epoch``: its metrics, the log row (training numbers summed over processes, validation
    accuracy, robust too when asked), and the epoch's loss summed over processes (one value on every process: all
    stop together if it is not finite). It writes nothing: :func:`record_epoch` does."""
    cfg, device = run.cfg, run.device
    loss_sum, correct, seen = all_reduce_sum([stats["loss_sum"], stats["correct"], float(stats["seen"])], device)
    row: Dict[str, Any] = {
        "epoch": epoch + 1,
        "step": run.step,
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "epoch_time_s": stats["time"],
        "images_per_s": seen / max(stats["time"], 1e-9),
        "precision": run.precision.name,
        "memory_format": run.precision.memory_format,
        "kap_blend": run.blend_at(run.step) if run.warmup_steps else "",
    }
    val_loader = run.loaders[1]
    if val_loader is not None:
        row["val_acc"] = _accuracy(run.eval_model, val_loader, device, cfg, attack=False)
        if cfg.val_attack_steps > 0:
            row["val_robust_acc"] = _accuracy(run.eval_model, val_loader, device, cfg, attack=True)
    return row, loss_sum


def record_epoch(run: Run, epoch: int, row: Dict[str, Any]) -> None:
    """Write epoch ``epoch``'s ``row`` to ``log.csv`` and the console; with early stopping, save the model as
    ``best.safetensors`` when its robust validation accuracy is the best so far."""
    _CsvLog(run.run_dir / "log.csv", run.env.is_main).write(row)
    run.say(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}))
    score = row.get("val_robust_acc", -1.0) if run.cfg.early_stop else float(epoch)
    if score > run.best:
        run.best = score
        if run.env.is_main and run.cfg.early_stop:
            extra = {**run.extra, "epoch": epoch + 1, **row}
            serialization.save(run.eval_model, run.run_dir / "best.safetensors", extra=extra)


def finish(run: Run) -> Dict[str, Any]:
    """The run's metrics; for a finished run also test accuracy (of the early-stopping epoch's model, if any),
    ``model.safetensors`` and ``metrics.json``."""
    cfg, device, test_loader = run.cfg, run.device, run.loaders[2]
    metrics: Dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "steps": run.step,
        "finished": not run.stopped,
        "precision": run.precision.describe(),
        "loader": run.loaders[3],
        "train_time_s": run.train_time,
        "compile": run.compile_mode or "off",
        "first_update_s": run.first_update_s,
    }
    if run.stopped:
        run.say(f"stopped after {run.step} updates (max_steps); rerun the same command to resume")
        return metrics
    final = run.eval_model
    if run.env.distributed:
        torch.distributed.barrier()  # best.safetensors is written by rank 0
    best = run.run_dir / "best.safetensors"
    if cfg.early_stop and best.is_file():
        final = serialization.load(best, device=device)
        metrics["early_stop_epoch"] = serialization.load_extra(best).get("epoch")
    metrics["test_acc"] = _accuracy(final, test_loader, device, cfg, attack=False)
    metrics["test_images"] = len(test_loader.dataset)
    if run.env.is_main:
        serialization.save(final, run.run_dir / "model.safetensors", extra={**run.extra, "metrics": metrics})
        write_text_atomically(run.run_dir / "metrics.json", json.dumps(metrics, indent=2), "metrics")
    run.say(json.dumps(metrics))
    return metrics


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train the model ``cfg`` describes and return the final metrics (also in ``<run>/metrics.json``)."""
    run = start(cfg)
    _CsvLog(run.run_dir / "log.csv", run.env.is_main)  # the header, before the first epoch
    for epoch in range(run.epoch, cfg.epochs):
        stats = train_one_epoch(run, epoch)
        if run.stopped:
            break
        if not cfg.sched_on_updates:
            run.scheduler.step(epoch + 1)
        run.train_time += stats["time"]
        row, loss_total = validate(run, epoch, stats)
        record_epoch(run, epoch, row)
        save_checkpoint(run, epoch + 1, 0, loss_total)
        if cfg.max_steps is not None and run.step >= cfg.max_steps:
            run.stopped = epoch + 1 < cfg.epochs
            break
    return finish(run)


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point of ``recipes/train_timm.py``."""
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ValueError, OSError, NotImplementedError, RuntimeError, FloatingPointError) as err:
        print(f"train_timm: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0
