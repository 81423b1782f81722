"""timm's TorchScript check on converted models, over a model list (not a test: minutes per dozen models).

For each model and grid (rect, square): ``kapify.convert`` (k=3, sigma=0.1, eval), ``torch.jit.script`` of a
copy, and the scripted output compared with eager's. One JSON line per check (a rerun skips those done), then
the count that passed.

    python scripts/torchscript_sweep.py models.txt results.jsonl   # models.txt: timm names or torchvision/<name>
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch


def check(name: str, grid: str) -> dict:
    from channel_graph_dump import build_listed  # beside this script: the same model list format

    import kapify
    from kapify.surgery.tracing import example_input

    model = build_listed(name)
    x = example_input(model)
    kap = kapify.convert(model, k=3, sigma=0.1, grid=grid, example_input=x).eval()
    try:
        scripted = torch.jit.script(copy.deepcopy(kap))
    except Exception as err:  # what timm's check would report
        return {"status": "fails to script", "error": f"{type(err).__name__}: {str(err)[:300]}"}
    with torch.no_grad():
        want, got = kap(x), scripted(x)
    diff = float((want - got).abs().max())
    ok = torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    return {"status": "passed" if ok else "outputs differ", "max_abs_diff": diff}


def main(argv: list) -> int:
    names = [n.strip() for n in Path(argv[0]).read_text().splitlines() if n.strip()]
    out = Path(argv[1])
    done = {(r["model"], r["grid"]) for r in map(json.loads, out.read_text().splitlines())} if out.is_file() else set()
    warnings.filterwarnings("ignore")
    with out.open("a") as f:
        for name in names:
            for grid in ("rect", "square"):
                if (name, grid) in done:
                    continue
                started = time.perf_counter()
                try:
                    row = check(name, grid)
                except Exception as err:  # conversion itself failed: not this check's business, but reported
                    row = {"status": "does not convert", "error": f"{type(err).__name__}: {str(err)[:300]}"}
                row = {"model": name, "grid": grid, **row, "seconds": round(time.perf_counter() - started, 2)}
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"{name} {grid}: {row['status']}", file=sys.stderr)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    passed = sum(r["status"] == "passed" for r in rows)
    print(f"{passed}/{len(rows)} checks passed")
    for r in rows:
        if r["status"] != "passed":
            print(f"  {r['model']} ({r['grid']}): {r['status']} {r.get('error', r.get('max_abs_diff', ''))}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
