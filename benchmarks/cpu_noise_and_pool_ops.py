#!/usr/bin/env python
"""The two CPU ops issue 24 rewrote, alone, side by side with what they replace (median of repeats):

- noise: ns per element of ``x + N(0, sigma^2)`` by torch's ``normal_`` then an add (``gaussian_like``, the path
  without the kernel), by
  kapify's compiled kernel (``kapify.layers.fast_noise``), and by ``torch.compile`` of the expression;
- pooling: forward + backward of a K=3 mean over channel-grid planes, torch's ``avg_pool2d`` against
  kapify's box sums (``box_mean``; ``channel_pool`` uses them on grids with rows of >= 16 channels).

    python benchmarks/cpu_noise_and_pool_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kapify.layers.channel_pool import box_mean
from kapify.layers.fast_noise import add_gaussian, fast_noise_available
from kapify.layers.noise import gaussian_like


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def noise_rows(repeats: int, with_compile: bool) -> None:
    print("noise: ns per element (batch 64 x 64 x 32 x 32, channels_last)")
    compiled = torch.compile(lambda t: t + torch.randn_like(t) * 0.1) if with_compile else None
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 64, 32, 32).to(dtype=dtype, memory_format=torch.channels_last)
        n = x.numel()

        row = {
            "torch normal_ + add": median_s(lambda: gaussian_like(x, 0.1).add_(x), repeats),
            "kapify kernel": median_s(lambda: add_gaussian(x, 0.1), repeats),
        }
        if compiled is not None:
            row["torch.compile"] = median_s(lambda: compiled(x), repeats)
        print(f"  {str(dtype):15s} " + "  ".join(f"{k} {v / n * 1e9:.2f}" for k, v in row.items()))


def pool_rows(repeats: int) -> None:
    print("K=3 mean over a (rows, cols) plane, forward + backward, bf16, ms: torch avg_pool2d / kapify box_mean")
    print("  (planes as channel_pool views a channels-last (N, C, H, W) input: (N, H*W, rows, cols), contiguous)")
    for shape in [(32, 64, 16, 16), (32, 16, 16, 32), (256, 64, 16, 16), (256, 1024, 8, 8)]:
        z = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(shape, dtype=torch.bfloat16)
        torch_pool = median_s(lambda: F.avg_pool2d(z, 3, 1, 1, count_include_pad=False).backward(g), repeats)
        box = median_s(lambda: box_mean(z, [3, 3]).backward(g), repeats)
        print(f"  {shape}: {torch_pool * 1e3:.2f} / {box * 1e3:.2f}  (box {torch_pool / box:.2f}x as fast)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out torch.compile (its compilation takes ~20 s)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not fast_noise_available():
        sys.exit("the compiled noise kernel is not available here (no C compiler?)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    noise_rows(args.repeats, not args.no_compile)
    pool_rows(args.repeats)


if __name__ == "__main__":
    main()
