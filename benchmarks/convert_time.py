"""Convert time of this checkout against another one (e.g. before a change), side by side.

Each model is converted in a fresh subprocess per checkout (one thread, best of two runs), the two
checkouts alternating model by model so that machine load hits both alike; prints the ratios and
writes JSON.

    git worktree add /tmp/kapify-base <commit>
    python benchmarks/convert_time.py --baseline /tmp/kapify-base --out time.json resnet50 skresnet18 tv/regnet_y_800mf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_TIME_ONE = """
import sys, time, warnings, torch
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
import kapify, timm, torchvision
from kapify.surgery.tracing import example_input
name = sys.argv[1]
model = (torchvision.models.get_model(name[3:]) if name.startswith("tv/") else timm.create_model(name)).eval()
x = example_input(model)
best = float("inf")
for _ in range(2):
    start = time.perf_counter()
    kapify.convert(model, k=3, sigma=0.1, example_input=x)
    best = min(best, time.perf_counter() - start)
print(best)
"""


def _seconds(checkout: str, name: str) -> float:
    env = {**os.environ, "PYTHONPATH": checkout}
    out = subprocess.run(
        [sys.executable, "-c", _TIME_ONE, name], env=env, cwd=checkout, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def _commit(checkout: str) -> str:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), to name what was compared."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=checkout, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="timm names, or tv/<name> for torchvision")
    parser.add_argument("--baseline", required=True, help="path of the other kapify checkout")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = {}
    print(f"{'model':32s} {'baseline s':>10s} {'this s':>8s} {'ratio':>6s}")
    for name in args.models:
        base, this = _seconds(args.baseline, name), _seconds(here, name)
        rows[name] = {"baseline_s": round(base, 3), "this_s": round(this, 3), "ratio": round(this / base, 3)}
        print(f"{name:32s} {base:10.2f} {this:8.2f} {this / base:6.2f}", flush=True)
    total = sum(r["this_s"] for r in rows.values()) / sum(r["baseline_s"] for r in rows.values())
    print(f"total {total:.2f}x, largest {max(r['ratio'] for r in rows.values()):.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"baseline": _commit(args.baseline), "this": _commit(here), "threads": 1, "models": rows,
                 "total_ratio": round(total, 3)},
                f,
                indent=1,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
