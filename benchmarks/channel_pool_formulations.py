"""Activation-space KAP: three formulations of the same op, timed side by side (forward + backward),
checked equal, printed as ratios to kapify's own (``avg_pool2d`` over a free (N*HW, 1, rows, cols) view).

- ``pool3d``: one ``avg_pool3d`` with a (K, K, 1) window over a free (N, 1, rows, cols, HW) view;
- ``separable``: a (K, 1, 1) then a (1, K, 1) ``avg_pool3d`` (rows, then columns; the border counts
  factorise, so this is exact);
- ``compiled``: ``torch.compile`` of kapify's op.

    python benchmarks/channel_pool_formulations.py --device cpu --batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kapify import channel_pool
from kapify.layers.grid import rect_grid


def pool3d(x: torch.Tensor, k: int, rows: int, cols: int) -> torch.Tensor:
    n, c, h, w = x.shape
    v = x.reshape(n, 1, rows, cols, h * w)
    out = F.avg_pool3d(v, (k, k, 1), 1, (k // 2, k // 2, 0), count_include_pad=False)
    return out.reshape(n, c, h, w)


def separable(x: torch.Tensor, k: int, rows: int, cols: int) -> torch.Tensor:
    n, c, h, w = x.shape
    v = x.reshape(n, 1, rows, cols, h * w)
    v = F.avg_pool3d(v, (k, 1, 1), 1, (k // 2, 0, 0), count_include_pad=False)
    v = F.avg_pool3d(v, (1, k, 1), 1, (0, k // 2, 0), count_include_pad=False)
    return v.reshape(n, c, h, w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    dev = torch.device(args.device)
    k = 3
    shapes = [(144, 32), (576, 4), (128, 16)]  # CIFAR ResNet18 stages (square 144 and 576; rect 128 = 8x16)
    kapify_op = lambda x, k, r, c: channel_pool(x, k, 1, (r, c), "avg")  # noqa: E731
    variants = {"kapify (avg_pool2d view)": kapify_op, "pool3d": pool3d, "separable": separable}
    if not args.no_compile:
        variants["compiled kapify"] = torch.compile(kapify_op, dynamic=False)
    rows_out = []
    for c, hw in shapes:
        grid = rect_grid(c)
        x = torch.randn(args.batch, c, hw, hw, device=dev, requires_grad=True)
        ref = kapify_op(x, k, grid.rows, grid.cols)
        times = {name: [] for name in variants}
        for name, fn in variants.items():  # warm-up (and compile) + equality
            out = fn(x, k, grid.rows, grid.cols)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            out.sum().backward()
        for _ in range(args.repeats):
            for name, fn in variants.items():  # interleaved: drift hits all alike
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(x, k, grid.rows, grid.cols).sum().backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["kapify (avg_pool2d view)"])
        for name in variants:
            med = statistics.median(times[name])
            rows_out.append(
                {
                    "channels": c,
                    "grid": str(grid),
                    "spatial": hw,
                    "variant": name,
                    "ms": 1000 * med,
                    "ratio": med / base,
                }
            )
    print(f"device {dev}, batch {args.batch}, K={k}, forward+backward, median of {args.repeats}")
    print(f"{'C':>5} {'grid':>6} {'HxW':>6}  {'variant':<26} {'ms':>9} {'ratio':>6}")
    for r in rows_out:
        print(
            f"{r['channels']:>5} {r['grid']:>6} {r['spatial']:>3}x{r['spatial']:<3} {r['variant']:<26} "
            f"{r['ms']:9.2f} {r['ratio']:6.2f}"
        )
    print(json.dumps({"device": str(dev), "rows": rows_out}))


if __name__ == "__main__":
    main()
