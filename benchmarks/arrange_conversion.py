#!/usr/bin/env python
"""How much of a trained model's accuracy survives ``kapify.convert`` (k, sigma=0), with and without
``kapify.arrange_channels`` first, and with BatchNorm statistics recalibrated on training images.

    python benchmarks/arrange_conversion.py runs/<plain run>/model.safetensors --data-dir ../shared/data

The checkpoint is a recipe run of a plain model (``--pool none``); its weights are loaded into the
plain architecture, then each variant is scored on the same 2,000 random test images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kapify  # noqa: E402
from kapify.data import build_dataset, dataset_info  # noqa: E402
from kapify.data.tensor_loader import tensor_arrays  # noqa: E402
from kapify.training import parse_args  # noqa: E402
from kapify.training.model import build_plain_model  # noqa: E402


def images(split_train: bool, n: int, seed: int, data_dir: str) -> tuple:
    x, y = tensor_arrays(build_dataset("cifar10", split_train, data_dir, download=False, num_samples=n, seed=seed))
    return x.permute(0, 3, 1, 2).float() / 255, y


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--k", type=int, nargs="+", default=[3])
    args = parser.parse_args()
    run_args = kapify.load_extra(args.checkpoint)["args"]
    cfg = parse_args(
        [
            "--model",
            run_args["model"],
            "--model-kwargs",
            str(run_args["model_kwargs"]),
            "--pool",
            "none",
            "--sigma",
            "0",
            "--grid",
            "rect",
            "--initial-checkpoint",
            args.checkpoint,
        ]
    )
    plain = build_plain_model(
        cfg, dataset_info("cifar10")
    ).eval()  # the trained weights in the plain (noise-free) model
    x, y = images(False, 2000, 0, args.data_dir)
    x_train, _ = images(True, 2000, 1, args.data_dir)
    example = torch.rand(1, 3, 32, 32)

    def accuracy(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((model.eval()(x).argmax(1) == y).float().mean())

    def recalibrated(model: torch.nn.Module) -> torch.nn.Module:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for i in range(0, len(x_train), 250):
                model(x_train[i : i + 250])
        return model

    arranged, report = kapify.arrange_channels(plain, example_input=example)
    print(f"plain: {accuracy(plain):.4f}   arranged plain: {accuracy(arranged):.4f}")
    for r in report:
        print(
            f"  {r.producers[0]:<16} grid {r.grid:<6} neighbour similarity {r.before:.3f} -> {r.after:.3f}"
            + (f"  (left: {r.skipped})" if r.skipped else "")
        )
    print("| k | convert | arrange + convert | convert + BN recalibration | arrange + convert + BN recalibration |")
    print("|---|---|---|---|---|")
    for k in args.k:
        scores = [
            accuracy(kapify.convert(m, k=k, sigma=0, grid="rect", example_input=example)) for m in (plain, arranged)
        ]
        scores += [
            accuracy(recalibrated(kapify.convert(m, k=k, sigma=0, grid="rect", example_input=example)))
            for m in (plain, arranged)
        ]
        print(f"| {k} | " + " | ".join(f"{100 * s:.1f}" for s in scores) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
