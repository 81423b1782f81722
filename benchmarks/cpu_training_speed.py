#!/usr/bin/env python
"""Training speed on this CPU through the recipe, before/after issue 12, measured side by side in one run.

before: fp32, contiguous, per-image transforms in a DataLoader (the recipes' CPU path until then);
after:  ``--amp auto`` (bf16 autocast + channels_last where the CPU has AMX/AVX512-BF16, else fp32)
        and the tensor loader (cached uint8 images, whole-batch crop + flip).

    python benchmarks/cpu_training_speed.py --data-dir ../shared/data --threads 1

Prints images/s per (model, variant, path) and the after/before and KAP/plain ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kapify.precision import cpu_has_fast_bf16  # noqa: E402
from kapify.training import parse_args, train  # noqa: E402

MODELS = {
    "convnet3 (width 64)": ["--config", str(ROOT / "recipes/configs/cifar10_convnet3_nt.yaml")],
    "ResNet18 (CIFAR stem)": ["--config", str(ROOT / "recipes/configs/cifar10_resnet18_nt.yaml")],
}
VARIANTS = {"plain": ["--pool", "none", "--sigma", "0"], "KAP σ=0.1": ["--pool", "avg", "--sigma", "0.1"]}
PATHS = {
    "before": ["--amp", "none", "--channels-last", "false", "--loader", "torch"],
    "after": ["--amp", "auto", "--loader", "tensor"],
}


def images_per_s(argv: list[str], out: str) -> tuple[float, str]:
    metrics = train(parse_args(argv + ["--output", out]))
    rows = list(csv.DictReader(open(Path(metrics["run_dir"]) / "log.csv")))
    return float(rows[-1]["images_per_s"]), metrics["precision"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = [
        "--data-dir",
        args.data_dir,
        "--no-download",
        "--epochs",
        "1",
        "--train-samples",
        str(args.train_samples),
        "--val-samples",
        "0",
        "--test-samples",
        "64",
        "--batch-size",
        str(args.batch_size),
        "--workers",
        "0",
        "--grid",
        "square",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, model_args in MODELS.items():
            for variant, variant_args in VARIANTS.items():
                for path, path_args in PATHS.items():
                    name = f"{len(rows)}"
                    speed, precision = images_per_s(
                        model_args + common + variant_args + path_args + ["--experiment", name], tmp
                    )
                    rows.append(
                        {
                            "model": model,
                            "variant": variant,
                            "path": path,
                            "precision": precision,
                            "images_per_s": speed,
                        }
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lookup = {(r["model"], r["variant"], r["path"]): r["images_per_s"] for r in rows}
    print(
        f"CPU: {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_fast_bf16()}, threads: {args.threads}, "
        f"batch {args.batch_size}, {args.train_samples} images, one epoch each\n"
    )
    print("| model | variant | before (img/s) | after (img/s) | after precision | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["path"] == "after":
            before = lookup[(r["model"], r["variant"], "before")]
            print(
                f"| {r['model']} | {r['variant']} | {before:.0f} | {r['images_per_s']:.0f} | {r['precision']} | "
                f"{r['images_per_s'] / before:.2f}x |"
            )
    print("\n| model | KAP/plain step time, before | after |\n|---|---|---|")
    for model in MODELS:
        ratio = {p: lookup[(model, "plain", p)] / lookup[(model, "KAP σ=0.1", p)] for p in PATHS}
        print(f"| {model} | {ratio['before']:.2f} | {ratio['after']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
