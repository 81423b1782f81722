#!/usr/bin/env python
"""Table 1's core rows in one command on one GPU: CIFAR-10 ResNet18 (CIFAR stem), NT(σ=0.1) vs
KAP(σ=0.1, K=3, square grid), fast schedule, then AutoAttack / PGD / Square, then the overhead benchmark.

    python benchmarks/gpu_table1.py --out results/gpu_table1 --data-dir .data        # about 9 min on one H200
    python benchmarks/gpu_table1.py --out /tmp/smoke --data-dir ../shared/data --smoke # any device, ~1 min on a CPU

Stages (each saves DIR/results.json and DIR/results.md before the next starts, so rerunning the same
command resumes; training itself resumes from its last.pth and the attacks from their batch cache):

1. speed probe: seconds per training step of each model (data on the device, bf16 + channels_last
   where fast: ``--amp auto``); the epoch count is chosen so that both trainings together fit
   ``--train-minutes`` (default 4), the same count for both models, at most the config's 30
   (on an H200 30 epochs took 34-38 s for NT and 47-50 s for KAP).
2. training with ``recipes/configs/cifar10_resnet18_fast_{nt,kap_s0.1}.yaml`` (warm-up scaled to
   the epoch count); time per epoch in each run's log.csv.
3. evaluation through ``kapify-eval``'s engine: clean accuracy on the full test set, PGD-L2 (100
   steps) at ε=0.5 and 1 on ``--n-examples`` fixed test images (seed 0) for both models, then
   AutoAttack-L2 (standard) at ε=0.5 and 1 on the first ``--aa-examples`` of them for KAP;
   each step saved when done, with the masking flags.
4. ``benchmarks/overhead.py`` on the same device (KAP's training / inference cost, batch 32 and 256).
5. AutoAttack for NT, then Square (5000 queries) at ε=1 for both (``--skip-square`` leaves it out).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # kapify runs from the checkout on the GPU machine

import torch  # noqa: E402

from kapify.data import dataset_info  # noqa: E402
from kapify.evaluation import EvalConfig, run_evaluation  # noqa: E402
from kapify.training import build_model, parse_args, train  # noqa: E402
from kapify.training.precision import resolve_precision  # noqa: E402

MODELS = {  # KAP first: if time runs out, the model in question has been attacked
    "KAP(σ=0.1, K=3)": ("kap_s0.1", "recipes/configs/cifar10_resnet18_fast_kap_s0.1.yaml", {}),
    "NT(σ=0.1)": ("nt_s0.1", "recipes/configs/cifar10_resnet18_fast_nt.yaml", {"sigma": 0.1}),
}
# attack groups in order of cost: each finished (group, model) is saved before the next starts
EVAL_GROUPS = {"pgd": ("clean,pgd", "0.5,1"), "aa": ("clean,autoattack", "0.5,1"), "square": ("clean,square", "1")}


def _save(out: Path, results: Dict[str, Any]) -> None:
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown(results))


def _configs(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    common = {"data_dir": args.data_dir, "download": False, "output": str(out / "runs"), "device": args.device, "workers": 0}
    if args.smoke:
        common.update(train_samples=256, val_samples=0, test_samples=200, batch_size=64, epochs=1, warmup_epochs=0)
    configs = {}
    for label, (name, path, overrides) in MODELS.items():
        if name not in args.models.split(","):
            continue
        cfg = parse_args(["--config", str(ROOT / path)])
        configs[label] = dataclasses.replace(cfg, **{**common, **overrides, "experiment": name})
    return configs


def probe_step_time(cfg, steps: int) -> float:
    """Median seconds of one training step (forward, backward, SGD) of ``cfg``'s model at its batch size."""
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
    if args.epochs:
        return args.epochs
    if args.smoke:
        return 1
    first = next(iter(configs.values()))
    steps_per_epoch = (50_000 - first.val_samples) // first.batch_size
    seconds = {label: probe_step_time(cfg, 10) * steps_per_epoch for label, cfg in configs.items()}
    results["probe"] = {"estimated_epoch_s": seconds, "steps_per_epoch": steps_per_epoch}
    # 15% margin for evaluation at epoch ends and the loader; at least 1 epoch, at most the config's 30
    return max(1, min(first.epochs, int(60 * args.train_minutes / (1.15 * sum(seconds.values())))))


def train_models(results: Dict[str, Any], configs: Dict[str, Any], epochs: int, out: Path) -> None:
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
            _save(out, results)
            continue
        log = (Path(metrics["run_dir"]) / "log.csv").read_text().splitlines()
        epoch_times = [float(line.split(",")[7]) for line in log[1:]]
        results["models"][label] = {
            "checkpoint": str(Path(metrics["run_dir"]) / "model.safetensors"), "epochs": epochs, "test_acc": metrics["test_acc"],
            "test_images": metrics["test_images"], "train_time_s": metrics["train_time_s"], "epoch_time_s": epoch_times,
            "precision": metrics["precision"], "loader": metrics["loader"],
        }
        _save(out, results)


def evaluate_models(results: Dict[str, Any], args: argparse.Namespace, out: Path, steps: List[Tuple[str, str]]) -> None:
    """Run each (attack group, model label) of ``steps`` not done yet, saving after each."""
    smoke = dict(pgd_steps=10, square_queries=100) if args.smoke else {}
    for key, label in steps:
        attacks, eps = EVAL_GROUPS[key]
        model = results["models"].get(label)
        if model is None or key in model.get("eval", {}):
            continue
        n_examples = args.aa_examples if key == "aa" and args.aa_examples else args.n_examples
        print(f"gpu_table1: {label}: {attacks} at eps {eps} on {n_examples} images", file=sys.stderr, flush=True)
        cfg = EvalConfig(checkpoint=model["checkpoint"], data_dir=args.data_dir, download=False, n_examples=n_examples,
                         seed=0, attacks=attacks, eps=eps, device=args.device, batch_size=500,
                         out=str(out / "eval" / MODELS[label][0] / key), progress=False, **smoke)
        started = time.perf_counter()
        try:
            done = run_evaluation(cfg)
        except Exception as err:
            results["errors"].append(f"evaluating {label} ({attacks}): {type(err).__name__}: {err}")
            _save(out, results)
            continue
        model.setdefault("eval", {})[key] = {
            "rows": [{"attack": r["attack"], "eps": r["eps"], "accuracy": r["accuracy"]["mean"], "n": r["n"]} for r in done["results"]],
            "n_examples": n_examples,
            "flags": [f["message"] for f in done["flags"]], "time_s": time.perf_counter() - started, "device": done["device"],
        }
        _save(out, results)


def run_overhead(results: Dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    if "overhead" in results or args.skip_overhead:
        return
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--device", device, "--out", str(out / "overhead.json")]
    cmd += ["--scenarios", "cifar", "--cifar-batch", "4", "--repeats", "1", "--warmup", "0"] if args.smoke else ["--cifar-batch", "32,256"]
    print("gpu_table1: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    (out / "overhead.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        results["errors"].append(f"overhead.py failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        _save(out, results)
        return
    results["overhead"] = {"command": " ".join(cmd[1:]), "rows": json.loads((out / "overhead.json").read_text())}
    _save(out, results)


def _robust(model: Dict[str, Any], attack: str, eps: float) -> str:
    for group in model.get("eval", {}).values():
        for row in group["rows"]:
            if row["attack"] == attack and abs(row["eps"] - eps) < 1e-9:
                return f"{100 * row['accuracy']:.1f} (n={row['n']})"
    return ""


def markdown(results: Dict[str, Any]) -> str:
    """The short table: per model, clean test accuracy, robust accuracy per attack, training cost."""
    env = results["environment"]
    lines = [f"# gpu_table1: CIFAR-10 ResNet18, NT(σ=0.1) vs KAP(σ=0.1, K=3){' (SMOKE RUN: not a result)' if results['smoke'] else ''}",
             "", f"Device: {env['device_name']}; torch {env['torch']}; command: `{results['command']}`.",
             f"Robust accuracy in % on {results['n_examples']} fixed CIFAR-10 (JPEG copy) test images (seed 0), L2; "
             "'clean' is the full test set.", "",
             "| model | epochs | clean | PGD ε=0.5 | PGD ε=1 | AA ε=0.5 | AA ε=1 | Square ε=1 | s/epoch | precision |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, m in results["models"].items():
        per_epoch = sorted(m["epoch_time_s"])[len(m["epoch_time_s"]) // 2] if m.get("epoch_time_s") else None
        lines.append(f"| {label} | {m['epochs']} | {100 * m['test_acc']:.2f} | {_robust(m, 'pgd', 0.5)} | {_robust(m, 'pgd', 1.0)} | "
                     f"{_robust(m, 'autoattack', 0.5)} | "
                     f"{_robust(m, 'autoattack', 1.0)} | {_robust(m, 'square', 1.0)} | "
                     f"{per_epoch:.1f} | {m['precision']} |" if per_epoch else f"| {label} | ... |")
    if results.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {e}" for e in results["errors"]]
    flags = [f"- {label}: {f}" for label, m in results["models"].items() for g in m.get("eval", {}).values() for f in g["flags"]]
    if flags:
        lines += ["", "Masking flags:", ""] + flags
    if "overhead" in results:
        lines += ["", "Overhead (`benchmarks/overhead.py`, ratios to plain):", "", "```",
                  (Path(results["out"]) / "overhead.txt").read_text().strip()[-3000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (results.json, results.md, runs/, eval/)")
    parser.add_argument("--data-dir", default=str(ROOT / ".data"), help="folder holding cifar10-jpeg/ or cifar-10-batches-py/")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--train-minutes", type=float, default=4.0, help="both trainings together (picks the epoch count)")
    parser.add_argument("--epochs", type=int, default=None, help="fix the epoch count instead")
    parser.add_argument("--n-examples", type=int, default=1000, help="attacked test images (the first n of one seeded order)")
    parser.add_argument("--aa-examples", type=int, default=500,
                        help="images for AutoAttack, the costliest stage (on an H200 it took 261 s for 1000 images x 2 eps of the NT model alone)")
    parser.add_argument("--models", default=",".join(name for name, _, _ in MODELS.values()),
                        help="comma-separated runs to train and attack (default: both)")
    parser.add_argument("--skip-overhead", action="store_true", help="leave out benchmarks/overhead.py")
    parser.add_argument("--skip-square", action="store_true", help="leave out Square (rerun without it to add it: the rest resumes)")
    parser.add_argument("--smoke", action="store_true", help="256 training images, 1 epoch, 20 attacked images: checks the pipeline")
    args = parser.parse_args(argv)
    known = [name for name, _, _ in MODELS.values()]
    if not args.models or set(args.models.split(",")) - set(known):
        parser.error(f"--models takes a comma-separated subset of {known}, got {args.models!r}")
    if args.smoke:
        args.n_examples, args.aa_examples = min(args.n_examples, 20), None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    results.update({"command": "python benchmarks/gpu_table1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "smoke": args.smoke, "out": str(out), "n_examples": args.n_examples,
                    "environment": {"device_name": device_name, "torch": torch.__version__}})
    results.setdefault("models", {})
    results["errors"] = []
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    configs = _configs(args, out)
    started = time.perf_counter()
    if "epochs" not in results:
        results["epochs"] = choose_epochs(results, configs, args)
        _save(out, results)
    train_models(results, configs, results["epochs"], out)
    kap, nt = MODELS  # the model in question first at each costly step
    evaluate_models(results, args, out, [("pgd", kap), ("pgd", nt), ("aa", kap)])
    run_overhead(results, args, out)
    evaluate_models(results, args, out, [("aa", nt)] + ([] if args.skip_square else [("square", kap), ("square", nt)]))
    results.setdefault("stage_time_s", []).append(time.perf_counter() - started)
    _save(out, results)
    print(markdown(results).split("\n\nOverhead")[0])
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
