#!/usr/bin/env python
"""Table 1's core rows on one GPU: CIFAR-10 ResNet18 (CIFAR stem), NT(σ=0.1) vs KAP(σ=0.1, K=3,
square grid), trained, then attacked on the same fixed test images, then the overhead benchmark.

Two schedules (``--schedule``):

- ``fast`` (default): ``recipes/configs/cifar10_resnet18_fast_{nt,kap_s0.1}.yaml`` (30 epochs, batch
  512, label smoothing 0.1), the epoch count fitted to ``--train-minutes`` by a speed probe; PGD-L2
  at ε=0.5 and 1, AutoAttack-L2 at ε=0.5 and 1 on ``--aa-examples``, Square.
- ``paper``: ``recipes/configs/cifar10_resnet18_{nt,kap}_s0.1.yaml`` as they are (SGD 0.1, cosine,
  200 epochs, batch 128, no label smoothing; ``--epochs`` sets another count, the same for both);
  compiled training (``--compile``, default auto: reduce-overhead on CUDA); then clean accuracy on
  the 10k test set, AutoAttack-L2 (standard) at ε=1 on ``--n-examples`` fixed images for both models,
  PGD-L2 as in Table A1 (100 steps, step 4/255) at ε=0.5 and 1, AutoAttack at ε=0.5, and the paired
  difference KAP − NT on the same images with its 95% interval.
- ``paper-eager``: the fallback where compiling fails or is slow on the GPU: the paper's configs eager, batch
  512 with the lr scaled linearly (0.4), no label smoothing (say so beside the result); the same steps.

    python benchmarks/gpu_table1.py --out runs/gpu_table1 --data-dir .data        # fast: about 9 min on one H200
    python benchmarks/gpu_table1.py --out /tmp/smoke --data-dir ../shared/data --smoke # any device, ~1 min on a CPU
    python benchmarks/gpu_table1.py --schedule paper --out /tmp/t1 --data-dir .data --stages train \
        --models kap_s0.1 --export $OUT

Every step saves DIR/results.json and DIR/results.md before the next starts, so rerunning the same
command resumes (training from its last.pth, attacks from their batch cache). Across GPU sessions,
which start on a bare machine and return at most 8 files of 16 MiB: ``--export DIR`` writes each
trained model as bf16 shards (``bf16_shards.py``) and the results to DIR after every step;
``--import DIR`` in a later session restores them (the attacked model is then the bf16-rounded one,
and its clean accuracy is measured again). The plan for the paper schedule is in docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # kapify runs from the checkout on the GPU machine

import torch  # noqa: E402
from bf16_shards import export_shards, import_shards  # noqa: E402

from kapify.data import dataset_info  # noqa: E402
from kapify.evaluation import EvalConfig, run_evaluation  # noqa: E402
from kapify.precision import resolve_precision  # noqa: E402
from kapify.reporting.paired import paired_rows, read_per_image  # noqa: E402
from kapify.training import build_model, parse_args, train  # noqa: E402
from kapify.training.compiling import COMPILE_MODES  # noqa: E402

KAP, NT = "KAP(σ=0.1, K=3)", "NT(σ=0.1)"  # KAP first: if time runs out, the model in question has been attacked
PAPER_EAGER = {"batch_size": 512, "lr": 0.4, "label_smoothing": 0.0, "compile": "off"}
SCHEDULES = {  # label -> (run name, config, overrides)
    "fast": {
        KAP: ("kap_s0.1", "recipes/configs/cifar10_resnet18_fast_kap_s0.1.yaml", {}),
        NT: ("nt_s0.1", "recipes/configs/cifar10_resnet18_fast_nt.yaml", {"sigma": 0.1}),
    },
    "paper": {
        KAP: ("kap_s0.1", "recipes/configs/cifar10_resnet18_kap_s0.1.yaml", {}),
        NT: ("nt_s0.1", "recipes/configs/cifar10_resnet18_nt_s0.1.yaml", {}),
    },
    # the fallback where compiling fails or is slow: the paper's configs eager, batch 512, lr scaled linearly
    # (0.1 x 512 / 128), still no label smoothing; stated beside the result
    "paper-eager": {
        KAP: ("kap_s0.1", "recipes/configs/cifar10_resnet18_kap_s0.1.yaml", PAPER_EAGER),
        NT: ("nt_s0.1", "recipes/configs/cifar10_resnet18_nt_s0.1.yaml", PAPER_EAGER),
    },
}
RUN_NAMES = ["kap_s0.1", "nt_s0.1"]
# attack groups: name -> (attacks, eps); each finished (group, model) is saved before the next starts
EVAL_GROUPS = {
    "pgd": ("clean,pgd", "0.5,1"),
    "aa": ("clean,autoattack", "0.5,1"),
    "square": ("clean,square", "1"),
    "test": ("clean", "1"),
    "aa1": ("clean,autoattack", "1"),
    "aa05": ("clean,autoattack", "0.5"),
}
# the order of each schedule's steps: the paper's number (AutoAttack at ε=1, both models) before the rest
PAPER_PLAN = [("test", KAP), ("test", NT), ("aa1", KAP), ("aa1", NT), ("pgd", KAP), ("pgd", NT), "overhead",
              ("aa05", KAP), ("aa05", NT), ("square", KAP), ("square", NT)]  # fmt: skip
PLANS = {
    "fast": [("pgd", KAP), ("pgd", NT), ("aa", KAP), "overhead", ("aa", NT), ("square", KAP), ("square", NT)],
    "paper": PAPER_PLAN,
    "paper-eager": PAPER_PLAN,
}
TABLE_A1_PGD_STEP = 4 / 255
COMPILE_CACHE = "compile_cache-{run}.bin"  # torch.compile's artifacts of one training, handed back with the results


def _save(out: Path, results: Dict[str, Any], export: Optional[Path] = None) -> None:
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown(results))
    if export is not None:  # what a GPU session hands back, after every step
        export.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md"):
            shutil.copyfile(out / name, export / name)


def checkpoint_path(out: Path, run: str) -> Path:
    return out / "runs" / run / "model.safetensors"


def _configs(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    common = {
        "data_dir": args.data_dir,
        "download": False,
        "output": str(out / "runs"),
        "device": args.device,
        "workers": 0,
        "compile": args.compile,
    }
    if args.smoke:
        common.update(train_samples=256, val_samples=0, test_samples=200, batch_size=64, epochs=1, warmup_epochs=0)
    configs = {}
    for label, (name, path, overrides) in SCHEDULES[args.schedule].items():
        if name not in args.models.split(","):
            continue
        cfg = parse_args(["--config", str(ROOT / path)])
        configs[label] = dataclasses.replace(cfg, **{**common, **overrides, "experiment": name})
    return configs


def probe_step_time(cfg, steps: int) -> float:
    """Median seconds of one eager training step (forward, backward, SGD) of ``cfg``'s model at its batch size."""
    from kapify.distributed import init_distributed

    _, device = init_distributed(cfg.device)
    model = build_model(cfg, dataset_info(cfg.dataset)).to(device).train()
    precision = resolve_precision(cfg.amp, cfg.channels_last, device)
    memory = torch.channels_last if precision.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(cfg.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    times: List[float] = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=precision.dtype) if precision.dtype else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up (cuDNN autotuning, allocator) excluded
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def choose_epochs(results: Dict[str, Any], configs: Dict[str, Any], args: argparse.Namespace) -> int:
    """The epoch count, the same for both models: ``--epochs``; 1 in a smoke run; the paper schedule's
    config (200); else the most that fit ``--train-minutes`` by an eager speed probe (fast schedule)."""
    first = next(iter(configs.values()))
    if args.smoke:
        return 1
    steps_per_epoch = (50_000 - first.val_samples) // first.batch_size
    seconds = {label: probe_step_time(cfg, 10) * steps_per_epoch for label, cfg in configs.items()}
    results["probe"] = {"eager_epoch_s": seconds, "steps_per_epoch": steps_per_epoch, "batch_size": first.batch_size}
    if args.epochs:
        return args.epochs
    if args.schedule.startswith("paper"):
        return first.epochs
    # 15% margin for evaluation at epoch ends and the loader; at least 1 epoch, at most the config's 30
    return max(1, min(first.epochs, int(60 * args.train_minutes / (1.15 * sum(seconds.values())))))


def train_models(
    results: Dict[str, Any], configs: Dict[str, Any], epochs: int, out: Path, export: Optional[Path]
) -> None:
    for label, cfg in configs.items():
        if results["models"].get(label, {}).get("test_acc") is not None:
            continue
        warmup = 0 if cfg.warmup_epochs == 0 else max(1, round(cfg.warmup_epochs * epochs / cfg.epochs))
        cfg = dataclasses.replace(cfg, epochs=epochs, warmup_epochs=min(warmup, epochs - 1) if epochs > 1 else 0)
        print(f"gpu_table1: training {label} for {epochs} epoch(s)", file=sys.stderr, flush=True)
        try:
            metrics = train(cfg)
        except Exception as err:  # one shot on a lent GPU: record the failure, go on with the other model
            results["errors"].append(f"training {label}: {type(err).__name__}: {err}")
            _save(out, results, export)
            continue
        log = (Path(metrics["run_dir"]) / "log.csv").read_text().splitlines()
        epoch_times = [float(line.split(",")[7]) for line in log[1:]]
        results["models"][label] = {
            "run": cfg.experiment,
            "epochs": epochs,
            "test_acc": metrics["test_acc"],
            "test_images": metrics["test_images"],
            "train_time_s": metrics["train_time_s"],
            "epoch_time_s": epoch_times,
            "precision": metrics["precision"],
            "loader": metrics["loader"],
            "compile": metrics["compile"],
            "first_update_s": metrics["first_update_s"],
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
        }
        if export is not None:
            results["models"][label]["shards"] = [
                p.name for p in export_shards(checkpoint_path(out, cfg.experiment), export / cfg.experiment)
            ]
            if metrics["compile"] != "off":
                results["models"][label]["compile_cache_bytes"] = save_compile_cache(export, cfg.experiment)
        _save(out, results, export)


def save_compile_cache(export: Optional[Path], run: str, limit: int = 15 * 2**20) -> Optional[int]:
    """Write the compiled kernels of this process (torch.compiler's cache artifacts) to ``export``, so that
    a later session on a bare machine compiles from them instead of from scratch; returns the bytes written."""
    if export is None or not hasattr(torch.compiler, "save_cache_artifacts"):
        return None
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or len(saved[0]) > limit:
        return None
    export.mkdir(parents=True, exist_ok=True)
    (export / COMPILE_CACHE.format(run=run)).write_bytes(saved[0])
    return len(saved[0])


def load_compile_cache(source: Path) -> List[str]:
    """Load the artifacts :func:`save_compile_cache` wrote (same torch and GPU) before compiling; their file names."""
    paths = sorted(source.glob(COMPILE_CACHE.format(run="*")))
    if not hasattr(torch.compiler, "load_cache_artifacts"):
        return []
    for path in paths:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    return [p.name for p in paths]


def import_models(results: Dict[str, Any], source: Path, out: Path) -> None:
    """Restore the trained models a previous session exported to ``source`` (bf16 shards + results.json)."""
    earlier = json.loads((source / "results.json").read_text()) if (source / "results.json").is_file() else {}
    for label, model in earlier.get("models", {}).items():
        checkpoint = checkpoint_path(out, model["run"])
        if label not in results["models"]:
            results["models"][label] = model
        if not checkpoint.is_file() and list(source.glob(f"{model['run']}.bf16-*.safetensors")):
            import_shards(source / model["run"], checkpoint)
            results["models"][label]["weights"] = "bf16 (imported)"
            results["models"][label].pop("eval", None)  # attacks on the rounded weights start over
    for key in ("epochs", "probe"):
        if key in earlier and key not in results:
            results[key] = earlier[key]


def evaluate_step(
    results: Dict[str, Any], args: argparse.Namespace, out: Path, key: str, label: str, export: Optional[Path]
) -> None:
    """Run attack group ``key`` on model ``label`` unless done; save."""
    attacks, eps = EVAL_GROUPS[key]
    model = results["models"].get(label)
    if model is None or key in model.get("eval", {}):
        return
    n_examples = {"aa": args.aa_examples or args.n_examples, "test": 10_000}.get(key, args.n_examples)
    if args.smoke:
        n_examples = min(n_examples, 40 if key == "test" else args.n_examples)
    options: Dict[str, Any] = dict(pgd_steps=10, square_queries=100) if args.smoke else {}
    if args.schedule.startswith("paper"):
        options["pgd_step_size"] = TABLE_A1_PGD_STEP
    print(f"gpu_table1: {label}: {attacks} at eps {eps} on {n_examples} images", file=sys.stderr, flush=True)
    cfg = EvalConfig(
        checkpoint=str(checkpoint_path(out, model["run"])),
        data_dir=args.data_dir,
        download=False,
        n_examples=n_examples,
        seed=0,
        attacks=attacks,
        eps=eps,
        device=args.device,
        batch_size=500,
        out=str(out / "eval" / model["run"] / key),
        progress=False,
        **options,
    )
    started = time.perf_counter()
    try:
        done = run_evaluation(cfg)
    except Exception as err:
        results["errors"].append(f"evaluating {label} ({attacks}): {type(err).__name__}: {err}")
        _save(out, results, export)
        return
    model.setdefault("eval", {})[key] = {
        "rows": [
            {"attack": r["attack"], "eps": r["eps"], "accuracy": r["accuracy"]["mean"], "n": r["n"]}
            for r in done["results"]
        ],
        "n_examples": n_examples,
        "flags": [f["message"] for f in done["flags"]],
        "time_s": time.perf_counter() - started,
        "device": done["device"],
    }
    results["paired"] = paired_differences(results, out)
    _save(out, results, export)


def paired_differences(results: Dict[str, Any], out: Path) -> Dict[str, Any]:
    """KAP − NT robust accuracy on the same images, per (attack, eps) both have: the mean of the per-image
    differences and its 95% interval (kapify.reporting.paired)."""
    kap, nt = results["models"].get(KAP), results["models"].get(NT)
    if not kap or not nt:
        return {}
    paired: Dict[str, Any] = {}
    for key in set(kap.get("eval", {})) & set(nt.get("eval", {})):
        files = [out / "eval" / m["run"] / key / "per_image.json" for m in (kap, nt)]
        if not all(f.is_file() for f in files):
            continue
        for row, d in paired_rows(read_per_image(files[0]), read_per_image(files[1])).items():
            if row.startswith("clean") and key != "test":
                continue
            paired[row] = {"kap": d.first, "nt": d.second, "difference": d.difference, "ci95": list(d.ci95),
                           "n": d.n, "kap_only": d.first_only, "nt_only": d.second_only}  # fmt: skip
    return dict(sorted(paired.items()))


def run_overhead(results: Dict[str, Any], args: argparse.Namespace, out: Path, export: Optional[Path]) -> None:
    if "overhead" in results or args.skip_overhead:
        return
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "overhead.py"),
        "--device",
        device,
        "--out",
        str(out / "overhead.json"),
    ]
    cmd += (
        ["--scenarios", "cifar", "--cifar-batch", "4", "--repeats", "1", "--warmup", "0"]
        if args.smoke
        else ["--cifar-batch", "32,256"]
    )
    print("gpu_table1: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    (out / "overhead.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        results["errors"].append(f"overhead.py failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        _save(out, results, export)
        return
    results["overhead"] = {"command": " ".join(cmd[1:]), "rows": json.loads((out / "overhead.json").read_text())}
    _save(out, results, export)


def _robust(model: Dict[str, Any], attack: str, eps: float, keys: Tuple[str, ...]) -> str:
    for key in keys:
        for row in model.get("eval", {}).get(key, {}).get("rows", []):
            if row["attack"] == attack and abs(row["eps"] - eps) < 1e-9:
                return f"{100 * row['accuracy']:.1f} (n={row['n']})"
    return ""


def _median(values: List[float]) -> Optional[float]:
    return sorted(values)[len(values) // 2] if values else None


def markdown(results: Dict[str, Any]) -> str:
    """The short table: per model, clean test accuracy, robust accuracy per attack, training cost; the paired
    differences."""
    env = results["environment"]
    schedule = results.get("schedule", "fast")
    lines = [
        f"# gpu_table1 ({schedule} schedule): CIFAR-10 ResNet18, NT(σ=0.1) vs KAP(σ=0.1, K=3)"
        f"{' (SMOKE RUN: not a result)' if results['smoke'] else ''}",
        "",
        f"Device: {env['device_name']}; torch {env['torch']}; command: `{results['command']}`.",
        f"Robust accuracy in % on {results['n_examples']} fixed CIFAR-10 (JPEG copy) test images (seed 0), L2; "
        "'clean' is the full test set at the end of training (fp32 weights)"
        + ("; 'clean (attacked weights)' the same for the weights the attacks ran on." if schedule != "fast" else ".")
        + (
            " Eager fallback: batch 512, lr 0.4 (scaled linearly), no label smoothing."
            if schedule == "paper-eager"
            else ""
        ),
        "",
        "| model | epochs | clean | clean (attacked weights) | PGD ε=0.5 | PGD ε=1 | AA ε=0.5 | AA ε=1 | Square ε=1 "
        "| s/epoch (eager probe) | first update s | precision, compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    probe = results.get("probe", {}).get("eager_epoch_s", {})
    for label, m in results["models"].items():
        per_epoch = _median(
            m.get("epoch_time_s", [])[1:] or m.get("epoch_time_s", [])
        )  # the first epoch includes compilation
        eager = f" ({probe[label]:.1f})" if label in probe else ""
        lines.append(
            f"| {label} | {m['epochs']} | {100 * m['test_acc']:.2f} | {_robust(m, 'clean', 1.0, ('test',))} | "
            f"{_robust(m, 'pgd', 0.5, ('pgd',))} | {_robust(m, 'pgd', 1.0, ('pgd',))} | "
            f"{_robust(m, 'autoattack', 0.5, ('aa', 'aa05'))} | {_robust(m, 'autoattack', 1.0, ('aa', 'aa1'))} | "
            f"{_robust(m, 'square', 1.0, ('square',))} | "
            f"{per_epoch if per_epoch is None else round(per_epoch, 2)}{eager} | "
            f"{m.get('first_update_s') or 0:.1f} | {m['precision']}, {m.get('compile', 'off')} |"
        )
    if results.get("paired"):
        lines += [
            "",
            "KAP − NT on the same images (percentage points; 95% interval of the paired difference):",
            "",
            "| attack | KAP | NT | KAP − NT | 95% interval | n | only KAP correct | only NT correct |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row, p in results["paired"].items():
            lines.append(
                f"| {row} | {100 * p['kap']:.1f} | {100 * p['nt']:.1f} | {100 * p['difference']:+.1f} | "
                f"[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}] | {p['n']} | {p['kap_only']} | "
                f"{p['nt_only']} |"
            )
    if results.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {e}" for e in results["errors"]]
    flags = [
        f"- {label}: {f}"
        for label, m in results["models"].items()
        for g in m.get("eval", {}).values()
        for f in g["flags"]
    ]
    if flags:
        lines += ["", "Masking flags:", ""] + flags
    if "overhead" in results and (Path(results["out"]) / "overhead.txt").is_file():
        lines += [
            "",
            "Overhead (`benchmarks/overhead.py`, ratios to plain):",
            "",
            "```",
            (Path(results["out"]) / "overhead.txt").read_text().strip()[-3000:],
            "```",
        ]
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (results.json, results.md, runs/, eval/)")
    parser.add_argument(
        "--schedule",
        default="fast",
        choices=sorted(SCHEDULES),
        help="fast (30 epochs, batch 512), paper (200, batch 128, compiled) or paper-eager (the paper's configs "
        "eager at batch 512, lr 0.4: the fallback where compiling fails or is slow)",
    )
    parser.add_argument(
        "--data-dir", default=str(ROOT / ".data"), help="folder holding cifar10-jpeg/ or cifar-10-batches-py/"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument(
        "--compile",
        default="auto",
        choices=list(COMPILE_MODES),
        help="torch.compile mode of training (auto: reduce-overhead on CUDA)",
    )
    parser.add_argument(
        "--stages", default="train,attack", help="train, attack (attacks and the overhead benchmark), or both"
    )
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=4.0,
        help="fast schedule: both trainings together (picks the epoch count)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="fix the epoch count instead (paper schedule: default 200)"
    )
    parser.add_argument(
        "--n-examples", type=int, default=1000, help="attacked test images (the first n of one seeded order)"
    )
    parser.add_argument(
        "--aa-examples",
        type=int,
        default=None,
        help="fast schedule: images for AutoAttack (default 500; on an H200 it took 261 s for 1000 images x 2 eps of "
        "the NT model)",
    )
    parser.add_argument(
        "--models", default=",".join(RUN_NAMES), help="comma-separated runs to train and attack (default: both)"
    )
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="also write results and bf16 weight shards here (a GPU session's $OUT)",
    )
    parser.add_argument(
        "--import",
        dest="import_dir",
        type=Path,
        default=None,
        help="restore models and results a session exported here",
    )
    parser.add_argument("--skip-overhead", action="store_true", help="leave out benchmarks/overhead.py")
    parser.add_argument(
        "--skip-square", action="store_true", help="leave out Square (rerun without it to add it: the rest resumes)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="256 training images, 1 epoch, 20 attacked images: checks the pipeline"
    )
    args = parser.parse_args(argv)
    if not args.models or set(args.models.split(",")) - set(RUN_NAMES):
        parser.error(f"--models takes a comma-separated subset of {RUN_NAMES}, got {args.models!r}")
    stages = set(args.stages.split(","))
    if not stages or stages - {"train", "attack"}:
        parser.error(f"--stages takes train, attack or train,attack, got {args.stages!r}")
    if args.schedule == "fast" and args.aa_examples is None:
        args.aa_examples = 500
    if args.smoke:
        args.n_examples, args.aa_examples = min(args.n_examples, 20), None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    if results.get("schedule", args.schedule) != args.schedule:
        parser.error(f"{out} holds a {results['schedule']}-schedule run: use another --out")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    results.update(
        {
            "command": "python benchmarks/gpu_table1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "schedule": args.schedule,
            "smoke": args.smoke,
            "out": str(out),
            "n_examples": args.n_examples,
            "environment": {"device_name": device_name, "torch": torch.__version__},
        }
    )
    results.setdefault("models", {})
    results["errors"] = []
    if args.import_dir is not None:
        import_models(results, args.import_dir, out)
        results["compile_cache_loaded"] = load_compile_cache(args.import_dir)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    configs = _configs(args, out)
    started = time.perf_counter()
    if "train" in stages:
        if "epochs" not in results:
            results["epochs"] = choose_epochs(results, configs, args)
            _save(out, results, args.export)
        train_models(results, configs, results["epochs"], out, args.export)
    if "attack" in stages:
        wanted = {label for label, (name, _, _) in SCHEDULES[args.schedule].items() if name in args.models.split(",")}
        for step in PLANS[args.schedule]:
            if step == "overhead":
                run_overhead(results, args, out, args.export)
            elif step[1] in wanted and not (args.skip_square and step[0] == "square"):
                evaluate_step(results, args, out, step[0], step[1], args.export)
    results.setdefault("stage_time_s", []).append(time.perf_counter() - started)
    _save(out, results, args.export)
    print(markdown(results).split("\n\nOverhead")[0])
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
