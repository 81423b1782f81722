"""``kapify-eval``: the paper's evaluation protocol end to end, from a checkpoint to results.json,
a Markdown table and plots. Long steps cache their batches under ``<out>/cache``: rerun the same
command after an interruption and it continues."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..data import build_dataset, dataset_info
from ..distributed import init_distributed, shutdown_distributed
from ..layers import set_noise
from ..options import option, parse_options
from ..surgery.config import get_config
from .attacks import ATTACKS, AttackSpec
from .certify import certified_accuracy, certify
from .checks import masking_flags
from .diagnostics import activation_change, first_conv, kernel_mosaic, topography_score
from .evaluate import attack_mode, evaluate, predict

__all__ = ["EvalConfig", "run_evaluation", "load_model", "main", "SCHEMA"]

SCHEMA = "kapify-eval/1"
NON_ADAPTIVE = (
    "non-adaptive: examples crafted noise-free, then re-scored with noise (the paper's Table 2); an attacker "
    "who knows about the noise does better: --test-noise --attacks autoattack-rand"
)


@dataclass
class EvalConfig:
    """Options of ``kapify-eval`` (see ``kapify-eval --help``)."""

    checkpoint: Optional[str] = option(None, "checkpoint written by kapify.save / recipes/train_timm.py")
    model: Optional[str] = option(None, "plain timm/torchvision model name (with --weights) instead of a checkpoint")
    weights: Optional[str] = option(None, "state_dict file (.safetensors or torch) for --model")
    model_kwargs: Dict[str, Any] = option({}, "extra factory arguments for --model")
    small_image: bool = option(False, "--model uses the 3x3 stride-1 small-image stem (CIFAR ResNets)")
    normalize: str = option(
        "dataset", "--model input normalisation: dataset (its mean/std), none", choices=["dataset", "none"]
    )
    dataset: str = option("cifar10", "cifar10, cifar100, tinyimagenet or imagenet (test/val split)")
    data_dir: Optional[str] = option(None, "data folder (default: $KAPIFY_DATA_DIR or ./data)")
    download: bool = option(True, "download the dataset when absent (needs internet)")
    n_examples: int = option(1000, "random test examples per repeat")
    repeats: int = option(
        1, "repeats with seeds seed..seed+repeats-1 (new examples and attack randomness): mean +- std"
    )
    seed: int = option(0, "first seed")
    attacks: str = option("clean,pgd,autoattack", f"comma-separated attacks: {', '.join(ATTACKS)}")
    norm: str = option("L2", "threat model", choices=["L2", "Linf"])
    eps: str = option("1.0", "budget(s), comma-separated for a sweep, e.g. 0.1,0.25,0.5,1,2,4")
    pgd_steps: int = option(100, "PGD steps (Table A1: 100)")
    pgd_step_size: Optional[float] = option(None, "PGD step size (default 2.5*eps/steps; Table A1 used 4/255)")
    square_queries: int = option(5000, "Square attack queries (Table A1: 5000)")
    batch_size: int = option(250, "attack batch size")
    noise_sensitivity: bool = option(
        False, "re-score adversarial examples with noise on input/activations (Table 2's protocol: NOT adaptive)"
    )
    test_noise: bool = option(
        False,
        "keep the model's noise on while attacking and scoring (randomised defence); attack it with autoattack-rand "
        "(EOT)",
    )
    noise_sigma: Optional[float] = option(None, "test-time noise std (default: the model's training sigma, else 0.1)")
    transfer_from: Optional[str] = option(
        None, "checkpoint of a reference model: its adversarial examples are scored here (Table A3)"
    )
    certify_sigma: Optional[float] = option(None, "randomized-smoothing certification with this sigma (Fig. 6)")
    certify_examples: int = option(100, "examples to certify")
    certify_n0: int = option(100, "CERTIFY n0 (selection samples)")
    certify_n: int = option(100_000, "CERTIFY n (estimation samples; the paper used 100000)")
    certify_alpha: float = option(0.001, "CERTIFY failure probability")
    diagnostics: bool = option(
        False, "first-layer kernels on the KAP grid + topography score, activation change (Fig. 7, A4)"
    )
    device: str = option("auto", "auto (cuda if available), cuda or cpu")
    out: str = option("results", "output folder for results.json, results.md, plots and the resume cache")
    resume: bool = option(True, "reuse cached attack batches from an earlier run of the same command")
    progress: bool = option(True, "progress bars")

    def eps_list(self) -> List[float]:
        try:
            values = [float(e) for e in str(self.eps).split(",") if e.strip()]
        except ValueError:
            raise ValueError(f"eps must be numbers separated by commas, got {self.eps!r}") from None
        if not values or any(not v > 0 for v in values):
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        return values

    def attack_list(self) -> List[str]:
        names = [a.strip() for a in self.attacks.split(",") if a.strip()]
        unknown = [a for a in names if a not in ATTACKS]
        if unknown or not names:
            raise ValueError(f"unknown attack(s) {unknown or self.attacks!r}; available: {', '.join(ATTACKS)}")
        return names


def load_model(cfg: EvalConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The model to attack: a kapify checkpoint, or a plain timm/torchvision model plus weights."""
    from .. import serialization
    from ..model_source import create_model
    from ..models import adapt

    if cfg.checkpoint:
        return serialization.load(cfg.checkpoint, device=device)
    if not (cfg.model and cfg.weights):
        raise ValueError("pass --checkpoint (a kapify checkpoint), or --model NAME with --weights FILE")
    if not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"no weights file at {cfg.weights!r}")
    model = create_model(cfg.model, **{"num_classes": num_classes, **cfg.model_kwargs})
    if cfg.small_image:
        model = adapt(model, "small_image_stem")
    if cfg.normalize == "dataset":
        info = dataset_info(cfg.dataset)
        model = adapt(model, "normalize_input", mean=list(info.mean), std=list(info.std))
    try:
        if cfg.weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(cfg.weights)
        else:
            state = torch.load(cfg.weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        model.load_state_dict(state)
    except Exception as err:
        raise ValueError(f"cannot load {cfg.weights!r} into {cfg.model}: {err}") from err
    return model.to(device)


def _examples(cfg: EvalConfig, dataset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(cfg.n_examples, len(dataset))
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    pairs = [dataset[i] for i in index]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def _aggregate(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows: Dict[tuple, Dict[str, Any]] = {}
    for r in runs:
        row = rows.setdefault(
            (r["attack"], r["norm"], r["eps"]),
            {
                "attack": r["attack"],
                "norm": r["norm"],
                "eps": r["eps"],
                "runs": [],
                "seeds": [],
                "time_s": 0.0,
                "n": r["n"],
                "notes": [],
            },
        )
        row["runs"].append(r["accuracy"])
        row["seeds"].append(r["seed"])
        row["time_s"] += r["time_s"]
        row["notes"].extend(n for n in r["notes"] if n not in row["notes"])
    for row in rows.values():
        row["accuracy"] = {
            "mean": statistics.fmean(row["runs"]),
            "std": statistics.stdev(row["runs"]) if len(row["runs"]) > 1 else 0.0,
        }
    return list(rows.values())


def _versions() -> Dict[str, str]:
    import timm

    from .. import __version__

    found = {
        "kapify": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
    try:
        from importlib.metadata import version

        found["pyautoattack"] = version("pyautoattack")
    except Exception:  # not installed: only the attacks that need it fail
        pass
    return found


def _noise_sensitivity(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, sigma: float, seed: int, batch: int
) -> List[Dict[str, Any]]:
    """Table 2: accuracy on adversarial examples with test-time noise on the input, the activations, or both."""
    device = next(model.parameters()).device
    rows = []
    for site_input, site_act in ((False, False), (False, True), (True, False), (True, True)):
        torch.manual_seed(seed)
        with attack_mode(model):
            set_noise(model, site_act, site="activation", sigma=sigma if site_act else None)
            correct = 0
            for i in range(0, len(y), batch):
                xb = x_adv[i : i + batch].to(device)
                if site_input:
                    xb = xb + sigma * torch.randn_like(xb)
                correct += int((predict(model, xb).cpu() == y[i : i + batch]).sum())
            set_noise(model, False, site="activation")
        rows.append(
            {
                "input_noise": site_input,
                "activation_noise": site_act,
                "sigma": sigma,
                "accuracy": correct / max(len(y), 1),
            }
        )
    return rows


def _write_per_image(path: Path, correct: Dict[tuple, torch.Tensor], seed: int) -> None:
    """Which of the (seeded) test images stayed correct under each attack: 1/0 per image, in the order
    the images were drawn, so that two models attacked on the same images compare image by image."""
    rows = {f"{attack} eps={eps:g}": [int(v) for v in flags.tolist()] for (attack, eps), flags in correct.items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"seed": seed, "rows": rows}))
    os.replace(tmp, path)


def run_evaluation(cfg: EvalConfig) -> Dict[str, Any]:
    """Run the evaluation ``cfg`` describes; write ``results.json``, ``results.md`` and plots under
    ``cfg.out``; return the results dict (schema in docs/evaluation.md)."""
    from ..reporting.eval_report import write_report

    attacks, eps_values = cfg.attack_list(), cfg.eps_list()
    info = dataset_info(cfg.dataset)
    if cfg.n_examples < 1 or cfg.repeats < 1:
        raise ValueError(f"n_examples and repeats must be >= 1, got {cfg.n_examples} and {cfg.repeats}")
    env, device = init_distributed(cfg.device)
    model = load_model(cfg, info.num_classes, device)
    if cfg.test_noise:
        trained = get_config(model)
        sigma = (
            cfg.noise_sigma
            if cfg.noise_sigma is not None
            else (trained.sigma if trained and trained.sigma > 0 else 0.1)
        )
        if set_noise(model, True, sigma=sigma) == 0:
            raise ValueError("--test-noise: the model has no kapify noise layers (convert it with sigma > 0)")
    dataset = build_dataset(cfg.dataset, train=False, data_dir=cfg.data_dir, download=cfg.download)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache" if cfg.resume else None
    spec = AttackSpec(
        norm=cfg.norm,
        eps=eps_values[0],
        pgd_steps=cfg.pgd_steps,
        pgd_step_size=cfg.pgd_step_size,
        square_queries=cfg.square_queries,
        num_classes=info.num_classes,
    )
    started = time.perf_counter()
    runs, first_examples, first_labels, first_images = [], {}, None, None
    for r in range(cfg.repeats):
        seed = cfg.seed + r
        images, labels = _examples(cfg, dataset, seed)
        want_examples = r == 0 and (cfg.noise_sensitivity or cfg.diagnostics)
        done = evaluate(
            model,
            images,
            labels,
            attacks,
            cfg.norm,
            eps_values,
            seed,
            cfg.batch_size,
            spec,
            return_examples=want_examples,
            cache_dir=cache,
            progress=cfg.progress and env.is_main,
            test_noise=cfg.test_noise,
        )
        runs.extend(done["results"])
        if r == 0:
            first_examples, first_labels, first_images = done["examples"], labels, images
            if env.is_main:
                _write_per_image(out / "per_image.json", done["correct"], seed)
    results: Dict[str, Any] = {
        "schema": SCHEMA,
        "config": dataclasses.asdict(cfg),
        "versions": _versions(),
        "device": str(device),
        "world_size": env.world_size,
        "dataset": dataclasses.asdict(info),
        "n_examples": cfg.n_examples,
        "seeds": [cfg.seed + r for r in range(cfg.repeats)],
        "results": _aggregate(runs),
    }
    config = get_config(model)
    results["model"] = {"checkpoint": cfg.checkpoint, "name": cfg.model, "kapify": config.to_dict() if config else None}
    adversarial = [a for a in attacks if a != "clean"]
    nominal = eps_values[len(eps_values) // 2] if 1.0 not in eps_values else 1.0
    chosen = next(
        ((a, nominal) for a in ("autoattack", "autoattack-rand", "pgd", "square") if (a, nominal) in first_examples),
        None,
    )
    if cfg.noise_sensitivity and chosen:
        sigma = (
            cfg.noise_sigma if cfg.noise_sigma is not None else (config.sigma if config and config.sigma > 0 else 0.1)
        )
        results["noise_sensitivity"] = {
            "attack": chosen[0],
            "eps": chosen[1],
            "protocol": NON_ADAPTIVE,
            "rows": _noise_sensitivity(model, first_examples[chosen], first_labels, sigma, cfg.seed, cfg.batch_size),
        }
    if cfg.transfer_from:
        from .. import serialization

        reference = serialization.load(cfg.transfer_from, device=device)
        transfer_runs = []
        for r in range(cfg.repeats):
            images, labels = _examples(cfg, dataset, cfg.seed + r)
            crafted = evaluate(
                reference,
                images,
                labels,
                adversarial or ["pgd"],
                cfg.norm,
                nominal,
                cfg.seed + r,
                cfg.batch_size,
                spec,
                return_examples=True,
                progress=False,
            )
            with attack_mode(model):
                clean_ok = torch.cat(
                    [
                        predict(model, images[i : i + cfg.batch_size].to(device)).cpu()
                        == labels[i : i + cfg.batch_size]
                        for i in range(0, len(labels), cfg.batch_size)
                    ]
                )
                for (attack, e), x_adv in crafted["examples"].items():
                    adv_ok = torch.cat(
                        [
                            predict(model, x_adv[i : i + cfg.batch_size].to(device)).cpu()
                            == labels[i : i + cfg.batch_size]
                            for i in range(0, len(labels), cfg.batch_size)
                        ]
                    )
                    transfer_runs.append(
                        {
                            "attack": f"transfer-{attack}",
                            "norm": cfg.norm,
                            "eps": e,
                            "seed": cfg.seed + r,
                            "accuracy": float((adv_ok & clean_ok).float().mean()),
                            "n": len(labels),
                            "time_s": 0.0,
                            "notes": [],
                        }
                    )
        results["transfer"] = {"reference": cfg.transfer_from, "results": _aggregate(transfer_runs)}
    if cfg.certify_sigma:
        n_cert = min(cfg.certify_examples, len(first_labels))
        with attack_mode(model):
            rows = certify(
                model,
                first_images[:n_cert],
                first_labels[:n_cert],
                cfg.certify_sigma,
                cfg.certify_n0,
                cfg.certify_n,
                cfg.certify_alpha,
                cfg.batch_size,
                cfg.seed,
                cfg.progress and env.is_main,
            )
        radii = [round(0.25 * i, 2) for i in range(0, 17)]
        results["certification"] = {
            "sigma": cfg.certify_sigma,
            "n0": cfg.certify_n0,
            "n": cfg.certify_n,
            "alpha": cfg.certify_alpha,
            "radii": radii,
            "certified_accuracy": certified_accuracy(rows, radii),
            "examples": rows,
        }
    if cfg.diagnostics:
        name, conv, grid = first_conv(model)
        results["diagnostics"] = {
            "first_conv": name,
            "grid": str(grid),
            "topography": topography_score(conv.weight, grid),
        }
        results["_mosaic"] = kernel_mosaic(conv.weight, grid)
        if cfg.transfer_from:  # the reference model's kernels beside this one's (NT beside KAP)
            from .. import serialization

            ref_name, ref_conv, ref_grid = first_conv(serialization.load(cfg.transfer_from, device="cpu"))
            results["diagnostics"]["reference"] = {
                "checkpoint": cfg.transfer_from,
                "first_conv": ref_name,
                "grid": str(ref_grid),
                "topography": topography_score(ref_conv.weight, ref_grid),
            }
            results["_reference_mosaic"] = kernel_mosaic(ref_conv.weight, ref_grid)
        if chosen:
            with attack_mode(model):
                results["diagnostics"]["activation_change"] = {
                    "attack": chosen[0],
                    "eps": chosen[1],
                    "layers": activation_change(
                        model,
                        first_images[: cfg.batch_size].to(device),
                        first_examples[chosen][: cfg.batch_size].to(device),
                    ),
                }
    flags = masking_flags(results["results"])
    for row in results["results"]:
        flags.extend({"kind": "attack_note", "message": f"{row['attack']} eps={row['eps']}: {n}"} for n in row["notes"])
    results["flags"] = flags
    results["time_s"] = time.perf_counter() - started
    if env.is_main:
        write_report(results, out)
    results.pop("_mosaic", None)
    results.pop("_reference_mosaic", None)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``kapify-eval`` command."""
    from .checks import AdversarialExampleError

    try:
        cfg = parse_options(
            EvalConfig, argv, "Robustness evaluation of kapify / timm / torchvision models", prog="kapify-eval"
        )
        results = run_evaluation(cfg)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError, AdversarialExampleError) as err:
        print(f"kapify-eval: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    for row in results["results"]:
        acc = row["accuracy"]
        print(
            f"{row['attack']:>12} {row['norm']} eps={row['eps']:<5g} {100 * acc['mean']:6.2f} +- "
            f"{100 * acc['std']:.2f} % (n={row['n']})"
        )
    for flag in results["flags"]:
        print(f"FLAG {flag['kind']}: {flag['message']}")
    print(f"wrote {Path(cfg.out) / 'results.json'} and results.md")
    return 0


if __name__ == "__main__":  # python -m kapify.evaluation.harness (used under torchrun)
    sys.exit(main())
