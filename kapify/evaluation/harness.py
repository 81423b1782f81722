"""``kapify-eval``: the paper's evaluation protocol end to end, from a checkpoint to results.json,
a Markdown table and plots. Long steps cache their batches under ``<out>/cache``: rerun the same
command after an interruption and it continues."""

from __future__ import annotations

import dataclasses
import json
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
from ..files import write_text_atomically
from ..heap import keep_freed_memory
from ..layers import set_noise
from ..options import option, parse_options
from ..surgery.config import get_config
from ..versions import versions
from .attack_model import ATTACK_PRECISIONS, attack_model, resolve_attack_precision
from .attacks import ATTACKS, AttackSpec
from .certify import certified_accuracy, certify
from .checks import masking_flags
from .evaluate import attack_mode, evaluate, predict
from .topography import activation_change, first_conv, kernel_mosaic, topography_score

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
    attack_precision: str = option(
        "auto",
        "what the attacks search on (examples are always scored on the model in fp32): exact (the model as it is), "
        "fp32 (folded, channels-last), bf16 (that under bf16 autocast), auto (bf16 on CPUs with native bf16, else "
        "fp32)",
        choices=list(ATTACK_PRECISIONS),
    )
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
    from ..models import adapt
    from ..models.factory import create_model

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
    write_text_atomically(path, json.dumps({"seed": seed, "rows": rows}), "per-image results")


@dataclass
class _Session:
    """What the sections of one evaluation share: the model, the data, the attack settings and the first repeat's
    images, labels and adversarial examples (attack, eps) -> tensor."""

    cfg: EvalConfig
    env: Any
    device: torch.device
    info: Any
    model: nn.Module
    dataset: Any
    spec: AttackSpec
    attacks: List[str]
    eps_values: List[float]
    images: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    examples: Optional[Dict[tuple, torch.Tensor]] = None
    _reference: Optional[nn.Module] = None
    _search: Optional[nn.Module] = None

    @property
    def sigma(self) -> float:
        """The test-time noise std: ``--noise-sigma``, else the model's training sigma, else 0.1."""
        if self.cfg.noise_sigma is not None:
            return self.cfg.noise_sigma
        trained = get_config(self.model)
        return trained.sigma if trained and trained.sigma > 0 else 0.1

    @property
    def nominal(self) -> float:
        """The eps the single-eps sections use: 1.0 if swept, else the middle of the sweep."""
        return 1.0 if 1.0 in self.eps_values else self.eps_values[len(self.eps_values) // 2]

    @property
    def chosen(self) -> Optional[tuple]:
        """The strongest attack run at the nominal eps: (attack, eps) of its examples, or None."""
        order = ("autoattack", "autoattack-rand", "pgd", "square")
        return next(((a, self.nominal) for a in order if (a, self.nominal) in (self.examples or {})), None)

    @property
    def attack_precision(self) -> str:
        """``--attack-precision`` resolved for the device (``auto`` -> bf16 or fp32)."""
        return resolve_attack_precision(self.cfg.attack_precision, self.device)

    def search_model(self) -> nn.Module:
        """What the attacks run on (``--attack-precision``), built once."""
        if self._search is None:
            self._search = attack_model(self.model, self.attack_precision, self.cfg.test_noise)
        return self._search

    def reference(self) -> nn.Module:
        """The ``--transfer-from`` model, loaded once."""
        if self._reference is None:
            from .. import serialization

            self._reference = serialization.load(self.cfg.transfer_from, device=self.device)
        return self._reference

    def correct(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image: whether ``model`` classifies it correctly (in batches, noise-free)."""
        step = self.cfg.batch_size
        with attack_mode(model):
            return torch.cat(
                [
                    predict(model, images[i : i + step].to(self.device)).cpu() == labels[i : i + step]
                    for i in range(0, len(labels), step)
                ]
            )


def _start(cfg: EvalConfig) -> _Session:
    """Check the options, load the model (test-time noise on if asked) and the test set."""
    attacks, eps_values = cfg.attack_list(), cfg.eps_list()
    info = dataset_info(cfg.dataset)
    if cfg.n_examples < 1 or cfg.repeats < 1:
        raise ValueError(f"n_examples and repeats must be >= 1, got {cfg.n_examples} and {cfg.repeats}")
    env, device = init_distributed(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    model = load_model(cfg, info.num_classes, device)
    dataset = build_dataset(cfg.dataset, train=False, data_dir=cfg.data_dir, download=cfg.download)
    spec = AttackSpec(
        norm=cfg.norm,
        eps=eps_values[0],
        pgd_steps=cfg.pgd_steps,
        pgd_step_size=cfg.pgd_step_size,
        square_queries=cfg.square_queries,
        num_classes=info.num_classes,
    )
    session = _Session(cfg, env, device, info, model, dataset, spec, attacks, eps_values)
    if cfg.test_noise and set_noise(model, True, sigma=session.sigma) == 0:
        raise ValueError("--test-noise: the model has no kapify noise layers (convert it with sigma > 0)")
    return session


def _attack_section(s: _Session, out: Path) -> List[Dict[str, Any]]:
    """Every attack at every eps on each repeat's images, aggregated over repeats; the first repeat's images,
    labels and examples are kept on the session and its per-image results written to ``per_image.json``."""
    cfg, runs = s.cfg, []
    for r in range(cfg.repeats):
        seed = cfg.seed + r
        images, labels = _examples(cfg, s.dataset, seed)
        done = evaluate(
            s.model,
            images,
            labels,
            s.attacks,
            cfg.norm,
            s.eps_values,
            seed,
            cfg.batch_size,
            s.spec,
            return_examples=r == 0 and (cfg.noise_sensitivity or cfg.diagnostics),
            cache_dir=out / "cache" / s.attack_precision if cfg.resume else None,
            progress=cfg.progress and s.env.is_main,
            test_noise=cfg.test_noise,
            search_model=s.search_model(),
        )
        runs.extend(done["results"])
        if r == 0:
            s.examples, s.labels, s.images = done["examples"], labels, images
            if s.env.is_main:
                _write_per_image(out / "per_image.json", done["correct"], seed)
    return _aggregate(runs)


def _noise_section(s: _Session) -> Optional[Dict[str, Any]]:
    """Table 2: the strongest attack's examples re-scored with test-time noise (non-adaptive, and says so)."""
    if not (s.cfg.noise_sensitivity and s.chosen):
        return None
    rows = _noise_sensitivity(s.model, s.examples[s.chosen], s.labels, s.sigma, s.cfg.seed, s.cfg.batch_size)
    return {"attack": s.chosen[0], "eps": s.chosen[1], "protocol": NON_ADAPTIVE, "rows": rows}


def _transfer_section(s: _Session) -> Optional[Dict[str, Any]]:
    """Table A3: examples crafted on the ``--transfer-from`` model at the nominal eps, scored on this one."""
    cfg = s.cfg
    if not cfg.transfer_from:
        return None
    runs = []
    for r in range(cfg.repeats):
        images, labels = _examples(cfg, s.dataset, cfg.seed + r)
        crafted = evaluate(
            s.reference(),
            images,
            labels,
            [a for a in s.attacks if a != "clean"] or ["pgd"],
            cfg.norm,
            s.nominal,
            cfg.seed + r,
            cfg.batch_size,
            s.spec,
            return_examples=True,
            progress=False,
        )
        clean_ok = s.correct(s.model, images, labels)
        for (attack, eps), x_adv in crafted["examples"].items():
            accuracy = float((s.correct(s.model, x_adv, labels) & clean_ok).float().mean())
            runs.append({"attack": f"transfer-{attack}", "norm": cfg.norm, "eps": eps, "seed": cfg.seed + r,
                         "accuracy": accuracy, "n": len(labels), "time_s": 0.0, "notes": []})  # fmt: skip
    return {"reference": cfg.transfer_from, "results": _aggregate(runs)}


def _certification_section(s: _Session) -> Optional[Dict[str, Any]]:
    """Randomized-smoothing certification (Cohen et al.) of the first repeat's images; certified accuracy by radius."""
    cfg = s.cfg
    if not cfg.certify_sigma:
        return None
    n = min(cfg.certify_examples, len(s.labels))
    with attack_mode(s.model):
        rows = certify(s.model, s.images[:n], s.labels[:n], cfg.certify_sigma, cfg.certify_n0, cfg.certify_n,
                       cfg.certify_alpha, cfg.batch_size, cfg.seed, cfg.progress and s.env.is_main)  # fmt: skip
    radii = [round(0.25 * i, 2) for i in range(0, 17)]
    return {"sigma": cfg.certify_sigma, "n0": cfg.certify_n0, "n": cfg.certify_n, "alpha": cfg.certify_alpha,
            "radii": radii, "certified_accuracy": certified_accuracy(rows, radii), "examples": rows}  # fmt: skip


def _diagnostics_section(s: _Session) -> tuple[Optional[Dict[str, Any]], List[torch.Tensor]]:
    """First-layer kernels on the KAP grid with a topography score (the reference model's too, with
    ``--transfer-from``), and the per-layer activation change under the strongest attack; the kernel mosaics."""
    if not s.cfg.diagnostics:
        return None, []
    name, conv, grid = first_conv(s.model)
    section: Dict[str, Any] = {"first_conv": name, "grid": str(grid), "topography": topography_score(conv.weight, grid)}
    mosaics = [kernel_mosaic(conv.weight, grid).cpu()]
    if s.cfg.transfer_from:  # the reference model's kernels beside this one's (NT beside KAP)
        ref_name, ref_conv, ref_grid = first_conv(s.reference())
        section["reference"] = {"checkpoint": s.cfg.transfer_from, "first_conv": ref_name, "grid": str(ref_grid),
                                "topography": topography_score(ref_conv.weight, ref_grid)}  # fmt: skip
        mosaics.append(kernel_mosaic(ref_conv.weight, ref_grid).cpu())
    if s.chosen:
        batch = s.cfg.batch_size
        with attack_mode(s.model):
            layers = activation_change(
                s.model, s.images[:batch].to(s.device), s.examples[s.chosen][:batch].to(s.device)
            )
        section["activation_change"] = {"attack": s.chosen[0], "eps": s.chosen[1], "layers": layers}
    return section, mosaics


def _flags(rows: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    """Gradient-masking patterns across the rows, and each attack's own notes."""
    flags = masking_flags(rows)
    for row in rows:
        flags.extend({"kind": "attack_note", "message": f"{row['attack']} eps={row['eps']}: {n}"} for n in row["notes"])
    return flags


def run_evaluation(cfg: EvalConfig) -> Dict[str, Any]:
    """Run the evaluation ``cfg`` describes; write ``results.json``, ``results.md`` and plots under
    ``cfg.out``; return the results dict (schema in docs/evaluation.md)."""
    from ..reporting.eval_report import write_report

    s = _start(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = get_config(s.model)
    results: Dict[str, Any] = {
        "schema": SCHEMA,
        "config": dataclasses.asdict(cfg),
        "versions": versions(),
        "device": str(s.device),
        "attack_precision": s.attack_precision,
        "world_size": s.env.world_size,
        "dataset": dataclasses.asdict(s.info),
        "n_examples": cfg.n_examples,
        "seeds": [cfg.seed + r for r in range(cfg.repeats)],
        "results": _attack_section(s, out),
        "model": {"checkpoint": cfg.checkpoint, "name": cfg.model, "kapify": config.to_dict() if config else None},
    }
    sections = {"noise_sensitivity": _noise_section(s), "transfer": _transfer_section(s),
                "certification": _certification_section(s)}  # fmt: skip
    sections["diagnostics"], mosaics = _diagnostics_section(s)
    results.update({key: value for key, value in sections.items() if value is not None})
    results["flags"] = _flags(results["results"])
    results["time_s"] = time.perf_counter() - started
    if s.env.is_main:
        write_report(results, out, mosaics)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``kapify-eval`` command."""
    from .checks import AdversarialExampleError

    try:
        cfg = parse_options(
            EvalConfig, argv, "Robustness evaluation of kapify / timm / torchvision models", prog="kapify-eval"
        )
        results = run_evaluation(cfg)
    except (ValueError, OSError, RuntimeError, FloatingPointError, AdversarialExampleError) as err:
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
