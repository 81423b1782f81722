#!/usr/bin/env python
"""The §4.2 convnet's CPU training step, side by side: what issue 32's two changes bring (images/s and ratios).

- heap: glibc keeps freed tensor memory (``kapify.heap.keep_freed_memory``), or not (``KAPIFY_KEEP_HEAP=0``);
- order: the block's ReLU after the max-pool (``SmallConvNet`` now), or before it (the paper's order; the same
  function, the ReLU on 4x the elements).

Each variant runs in its own process (the heap setting is per process), NT(σ=0.1) and KAP(σ=0.1, K=3) in each,
bf16 autocast + channels-last, batch 128, 3-layer width-64 convnet; rounds are interleaved and the median is
reported, so a busy machine slows every variant alike.

    python benchmarks/cpu_convnet_step.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"before (heap off, ReLU then pool)": ("0", "relu-pool"), "heap on": ("1", "relu-pool"),
            "ReLU after pool": ("0", "pool-relu"), "after (both)": ("1", "pool-relu")}  # fmt: skip


def _child(order: str, threads: int, steps: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    import kapify
    from kapify.heap import keep_freed_memory
    from kapify.models import SmallConvNet

    torch.set_num_threads(threads)
    keep_freed_memory()
    speeds = {}
    for name, pool in (("NT(σ=0.1)", None), ("KAP(σ=0.1)", "avg")):
        torch.manual_seed(0)
        net = SmallConvNet(depth=3, width=64)
        if order == "relu-pool":  # the paper's block order: conv, BN, ReLU, max-pool
            for block in net.features:
                block[2], block[3] = block[3], block[2]
        model = kapify.convert(net, k=3, sigma=0.1, pool=pool).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        x = torch.rand(128, 3, 32, 32).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,))
        for i in range(steps + 5):
            if i == 5:
                start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        speeds[name] = 128 * steps / (time.perf_counter() - start)
    print(json.dumps(speeds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.threads, args.steps)
        return 0
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant, (heap, order) in VARIANTS.items():
            env = {**os.environ, "KAPIFY_KEEP_HEAP": heap}
            cmd = [sys.executable, __file__, "--child", order, "--threads", str(args.threads)]
            cmd += ["--steps", str(args.steps)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = None
    print(f"§4.2 convnet training step, batch 128, bf16 + channels-last, {args.threads} thread(s); median of "
          f"{args.rounds} rounds (images/s; ratio to 'before')")  # fmt: skip
    for variant, results in runs.items():
        medians = {m: statistics.median(r[m] for r in results) for m in results[0]}
        base = base or medians
        cells = [f"{m} {v:6.0f} ({v / base[m]:.2f}x)" for m, v in medians.items()]
        print(f"{variant:34s} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
