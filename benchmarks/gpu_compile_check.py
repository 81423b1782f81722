#!/usr/bin/env python
"""The compiled-trainer check (issue 30), run first on a GPU: does ``torch.compile`` train what eager trains?

For NT and KAP (K=3, square) CIFAR ResNet18 (the paper configs), with σ=0 and with σ=0.1: one set of initial
weights and one list of batches, ``--steps`` SGD updates eager and the same updates compiled
(``--mode``, default reduce-overhead), bf16 autocast and channels-last on CUDA. Passes when, with σ=0, every
compiled loss is within ``--rtol`` of the eager one (bf16 rounding differs between the two), and with σ=0.1
(noise drawn differently) the mean loss of the last half is within ``--mean-rtol``. Also seconds per epoch at
batch 128 (390 updates), eager and compiled, compilation apart. Only if it passes should ``--compile auto``
compile on CUDA (``kapify.training.compiling.CUDA_COMPILE_CHECKED``).

    python benchmarks/gpu_compile_check.py --out $OUT/compile_check.json             # on the GPU, ~2-4 min
    python benchmarks/gpu_compile_check.py --smoke --out /tmp/check.json             # CPU rehearsal
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kapify.data import dataset_info  # noqa: E402
from kapify.training import build_model, parse_args  # noqa: E402

CONFIGS = {
    "NT": "recipes/configs/cifar10_resnet18_nt_s0.1.yaml",
    "KAP": "recipes/configs/cifar10_resnet18_kap_s0.1.yaml",
}


def _steps(model: torch.nn.Module, batches: List, device: torch.device, compiled: bool, mode: str) -> Dict[str, Any]:
    """SGD updates over ``batches``: the losses, the first update's seconds and the median of the others."""
    torch.manual_seed(1)  # the same noise stream for eager and compiled (their draws still differ in order)
    run = torch.compile(model, mode=None if mode == "default" else mode) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    losses, times = [], []
    for x, y in batches:
        start = time.perf_counter()
        if compiled and mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))  # a sync per step: the timings are per update
        times.append(time.perf_counter() - start)
    return {"losses": losses, "first_update_s": times[0], "step_s": statistics.median(times[1:] or times)}


def check(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = dataset_info("cifar10")
    gen = torch.Generator().manual_seed(0)
    batch = 8 if args.smoke else 128
    batches = [(torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
               for _ in range(args.steps)]  # fmt: skip
    batches = [(x.to(device).to(memory_format=torch.channels_last), y.to(device)) for x, y in batches]
    report: Dict[str, Any] = {"device": str(device), "mode": args.mode, "steps": args.steps, "torch": torch.__version__,
                              "runs": {}}  # fmt: skip
    for name, path in CONFIGS.items():
        for sigma in (0.0, 0.1):
            cfg = dataclasses.replace(parse_args(["--config", str(ROOT / path)]), sigma=sigma)
            if args.smoke:
                cfg = dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, "layers": [1, 1, 1, 1]})
            torch.manual_seed(0)
            model = build_model(cfg, info).to(device).to(memory_format=torch.channels_last).train()
            eager = _steps(copy.deepcopy(model), batches, device, False, args.mode)
            compiled = _steps(copy.deepcopy(model), batches, device, True, args.mode)
            half = len(batches) // 2
            if sigma == 0:
                worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(eager["losses"], compiled["losses"]))
                passed = worst <= args.rtol
            else:
                a, b = statistics.mean(eager["losses"][half:]), statistics.mean(compiled["losses"][half:])
                worst = abs(a - b) / max(abs(a), 1e-6)
                passed = worst <= args.mean_rtol
            report["runs"][f"{name} σ={sigma:g}"] = {
                "passed": passed, "worst_relative_difference": worst, "eager": eager, "compiled": compiled,
                "epoch_s_eager": eager["step_s"] * 390, "epoch_s_compiled": compiled["step_s"] * 390,
                "compile_s": compiled["first_update_s"] - compiled["step_s"],
            }  # fmt: skip
            print(f"{name} σ={sigma:g}: {'pass' if passed else 'FAIL'} (worst {worst:.3g}); s/epoch eager "
                  f"{eager['step_s'] * 390:.2f}, compiled {compiled['step_s'] * 390:.2f}", flush=True)  # fmt: skip
    report["passed"] = all(r["passed"] for r in report["runs"].values())
    return report


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON report")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode")
    parser.add_argument("--rtol", type=float, default=0.02, help="σ=0: largest relative loss difference per step")
    parser.add_argument("--mean-rtol", type=float, default=0.05, help="σ=0.1: relative difference of mean losses")
    parser.add_argument("--device", default=None)
    parser.add_argument("--smoke", action="store_true", help="a CPU rehearsal: ResNet10-size model, batch 8")
    args = parser.parse_args(argv)
    if args.smoke:
        args.mode = "default" if args.mode == "reduce-overhead" else args.mode
    report = check(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"compiled-trainer check: {'PASSED' if report['passed'] else 'FAILED'} ({args.out})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
