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
from ..data.loader import default_transform
from ..data.tensor_loader import TensorLoader, tensor_arrays
from ..distributed import DistEnv, all_reduce_sum, init_distributed, shutdown_distributed
from ..surgery import set_blend
from ..surgery.arrange import ARRANGE_METHODS
from .checkpoint import load_state, rng_state, save_state, set_rng_state
from .compiling import compile_model, resolve_compile
from .config import TrainConfig, parse_args
from .model import build_model
from .objectives import OBJECTIVES
from .precision import resolve_precision

__all__ = ["train", "main"]

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


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train the model ``cfg`` describes and return the final metrics (also in ``<run>/metrics.json``)."""
    _check(cfg)
    env, device = init_distributed(cfg.device)
    info = dataset_info(cfg.dataset)
    run_dir = Path(cfg.output) / (cfg.experiment or cfg.run_name())
    run_dir.mkdir(parents=True, exist_ok=True)
    _seed_all(cfg.seed)
    model = build_model(cfg, info).to(device)
    train_loader, val_loader, test_loader, loader_kind = _datasets(cfg, env, device)
    precision = resolve_precision(cfg.amp, cfg.channels_last, device)

    import timm.optim
    import timm.scheduler
    from timm.utils import ModelEmaV3

    optimizer = timm.optim.create_optimizer_v2(
        model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    updates_per_epoch = len(train_loader)
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
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    amp_dtype, channels_last = precision.dtype, precision.channels_last
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None

    start_epoch, skip, step, best, pending_rng, train_time = 0, 0, 0, -1.0, None, 0.0
    first_update_s: Optional[float] = None
    resume_path = run_dir / "last.pth" if cfg.resume == "auto" else (None if cfg.resume == "none" else Path(cfg.resume))
    state = load_state(resume_path) if resume_path is not None else None
    if cfg.resume not in ("auto", "none") and state is None:
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint")
    if state is not None:
        for key in ("model", "model_kwargs", "dataset", "pool", "kap_k", "grid", "width_mult", "objective", "seed"):
            if state["config"].get(key) != getattr(cfg, key):
                raise ValueError(
                    f"{resume_path} belongs to a run with {key}={state['config'].get(key)!r}, not "
                    f"{getattr(cfg, key)!r}; "
                    f"use another --experiment, or --resume none to start over"
                )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        start_epoch, skip, step, best, pending_rng = (
            state["epoch"],
            state["batch"],
            state["step"],
            state["best"],
            state["rng"],
        )
        train_time = state.get("train_time", 0.0)
        if env.is_main:
            print(f"resuming {run_dir} at epoch {start_epoch}, batch {skip} (update {step})", file=sys.stderr)

    compile_mode = resolve_compile(cfg.compile, device, cfg.objective)
    cuda_graphs = compile_mode in ("reduce-overhead", "max-autotune")
    if env.is_main:
        print(
            f"training in {precision.describe()} on {device}, {loader_kind} data loader, "
            f"{'compiled (' + compile_mode + ')' if compile_mode else 'eager'}",
            file=sys.stderr,
        )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if env.distributed and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model: nn.Module = model
    if env.distributed:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = compile_model(train_model, compile_mode)
    objective = OBJECTIVES[cfg.objective]
    warmup_steps = round(cfg.kap_warmup_epochs * updates_per_epoch) if cfg.pool == "avg" else 0

    def blend_at(
        update: int,
    ) -> float:  # KAP warm-start: a function of the update count, so a resumed run continues it exactly
        return min(1.0, update / warmup_steps)

    log = _CsvLog(run_dir / "log.csv", env.is_main)

    def checkpoint(epoch: int, batch: int, loss_total: float) -> None:
        """Save last.pth, unless the loss went non-finite since the last save: then that one is kept."""
        if not math.isfinite(loss_total):
            raise FloatingPointError(_diverged(loss_total, step, run_dir))
        if env.is_main:
            save_state(
                run_dir / "last.pth",
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "scaler": scaler.state_dict() if scaler else None,
                    "epoch": epoch,
                    "batch": batch,
                    "step": step,
                    "best": best,
                    "rng": rng_state(),
                    "train_time": train_time,
                    "config": dataclasses.asdict(cfg),
                },
            )

    extra = {"args": dataclasses.asdict(cfg), "dataset": dataclasses.asdict(info)}
    stopped = False
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        batches = _batches(train_loader, epoch, skip, pending_rng)
        pending_rng, first, remaining = None, skip, len(train_loader)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.float64)
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(
            batches,
            total=remaining,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not env.is_main,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        for batch_index, (x, y) in enumerate(bar, start=first):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            if warmup_steps:
                set_blend(model, blend_at(step))
            if cuda_graphs:  # a new iteration: the graphs may overwrite the previous step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                loss, logits = objective(train_model, x, y, cfg)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            if first_update_s is None:  # this process's first update: compilation (if any) included
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first_update_s = time.perf_counter() - t0
            if ema is not None:
                ema.update(model, step=step)
            if cfg.sched_on_updates:
                scheduler.step_update(num_updates=step)
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            if step % max(cfg.log_every, 1) == 0 or batch_index + 1 == first + remaining:
                mean_loss = loss_sum.item() / seen  # one device sync per log interval, not per update
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(_diverged(mean_loss, step, run_dir))
                bar.set_postfix(
                    loss=f"{mean_loss:.3f}",
                    acc=f"{correct.item() / seen:.3f}",
                    lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                )
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped = batch_index + 1 < first + remaining
                if stopped:
                    checkpoint(epoch, batch_index + 1, loss_sum.item())
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(epoch, batch_index + 1, loss_sum.item())
        bar.close()
        skip = 0
        if stopped:
            break
        if not cfg.sched_on_updates:
            scheduler.step(epoch + 1)
        elapsed = time.perf_counter() - t0
        train_time += elapsed
        loss_sum, correct, seen = all_reduce_sum([loss_sum.item(), correct.item(), float(seen)], device)
        eval_model = ema.module if ema is not None else model
        row: Dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "epoch_time_s": elapsed,
            "images_per_s": seen / max(elapsed, 1e-9),
            "precision": precision.name,
            "memory_format": precision.memory_format,
            "kap_blend": blend_at(step) if warmup_steps else "",
        }
        if val_loader is not None:
            row["val_acc"] = _accuracy(eval_model, val_loader, device, cfg, attack=False)
            if cfg.val_attack_steps > 0:
                row["val_robust_acc"] = _accuracy(eval_model, val_loader, device, cfg, attack=True)
        log.write(row)
        if env.is_main:
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr)
        score = row.get("val_robust_acc", -1.0) if cfg.early_stop else float(epoch)
        if score > best:
            best = score
            if env.is_main and cfg.early_stop:
                serialization.save(eval_model, run_dir / "best.safetensors", extra={**extra, "epoch": epoch + 1, **row})
        checkpoint(epoch + 1, 0, loss_sum)
        if cfg.max_steps is not None and step >= cfg.max_steps:
            stopped = epoch + 1 < cfg.epochs
            break

    metrics: Dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": step,
        "finished": not stopped,
        "precision": precision.describe(),
        "loader": loader_kind,
        "train_time_s": train_time,
        "compile": compile_mode or "off",
        "first_update_s": first_update_s,
    }
    if stopped:
        if env.is_main:
            print(f"stopped after {step} updates (max_steps); rerun the same command to resume", file=sys.stderr)
        return metrics
    final = ema.module if ema is not None else model
    if env.distributed:
        torch.distributed.barrier()  # best.safetensors is written by rank 0
    if cfg.early_stop and (run_dir / "best.safetensors").is_file():
        final = serialization.load(run_dir / "best.safetensors", device=device)
        metrics["early_stop_epoch"] = serialization.load_extra(run_dir / "best.safetensors").get("epoch")
    metrics["test_acc"] = _accuracy(final, test_loader, device, cfg, attack=False)
    metrics["test_images"] = len(test_loader.dataset)
    if env.is_main:
        serialization.save(final, run_dir / "model.safetensors", extra={**extra, "metrics": metrics})
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics), file=sys.stderr)
    return metrics


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
