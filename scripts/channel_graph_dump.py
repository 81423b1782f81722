"""Dump the channel graph (groups, layouts, constraints) and the conversion (``convert``'s per-layer record:
widths, grids, spare filters, why not square) of models as JSON lines, to diff two commits.

Used to check that a refactor of ``kapify.surgery`` keeps behaviour: run it on both commits with the same
model list and compare the files with ``--diff`` (``seconds`` and the config's ``version`` aside).

    python scripts/channel_graph_dump.py models.txt graphs.jsonl     # models.txt: timm names or torchvision/<name>
    python scripts/channel_graph_dump.py --shard 0/2 models.txt part0.jsonl   # every 2nd model from the 1st
    python scripts/channel_graph_dump.py --diff before.jsonl after.jsonl      # exit 1 if a model differs
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch

VOLATILE = ("version", "plan")  # the config's format, and the replay data a later format adds


def build_listed(name: str) -> torch.nn.Module:
    """The eval-mode model a list line names: a timm name, or torchvision/<name> (random weights)."""
    import timm
    import torchvision

    if name.startswith("torchvision/"):
        return torchvision.models.get_model(name.split("/")[1], weights=None).eval()
    return timm.create_model(name, pretrained=False).eval()


def dump(name: str) -> dict:
    import kapify
    from kapify.surgery.channels import analyze_channels
    from kapify.surgery.tracing import example_input

    model = build_listed(name)
    x = example_input(model)
    graph = analyze_channels(model, x)
    kap = kapify.convert(model, k=3, sigma=0.1, example_input=x)
    config = kapify.get_config(kap).to_dict()
    return {
        "convert": {k: v for k, v in config.items() if k not in VOLATILE},
        "shapes": {k: list(v.shape) for k, v in kap.state_dict().items()},
        "groups": [
            [g.id, g.width, g.producers, g.consumers, g.channelwise, g.divisor, g.fixed, g.normalised]
            for g in graph.groups
        ],
        "inputs": graph.inputs,
        "outputs": graph.outputs,
        "channelwise": graph.channelwise,
        "parameters": {k: [dim, list(lo)] for k, (dim, lo) in graph.parameters.items()},
        "spread": graph.spread,
        "slices": [[s.owner, s.boundaries, s.kind] for s in graph.slices],
        "ties": graph.ties,
        "multiplied": {str(k): v for k, v in graph.multiplied.items()},
    }


def diff(before: str, after: str) -> int:
    """Print the models whose dumps differ (timing aside); 1 if any does, or if the model lists differ."""
    rows = [{}, {}]
    for rows_of, path in zip(rows, (before, after)):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                row.pop("seconds", None)
                rows_of[row.pop("model")] = row
    differ = sorted(n for n in rows[0].keys() & rows[1].keys() if rows[0][n] != rows[1][n])
    only = sorted(rows[0].keys() ^ rows[1].keys())
    for name in differ:
        keys = sorted(
            k for k in rows[0][name].keys() | rows[1][name].keys() if rows[0][name].get(k) != rows[1][name].get(k)
        )
        print(f"differs: {name} ({', '.join(keys)})")
    print(f"{len(rows[0].keys() & rows[1].keys())} models in both, {len(differ)} differ, {len(only)} in one file only")
    return 1 if differ or only else 0


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--diff"]:
        return diff(args[1], args[2])
    shard, count = (int(v) for v in args[1].split("/")) if args[:1] == ["--shard"] else (0, 1)
    args = args[2:] if args[:1] == ["--shard"] else args
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with open(args[0]) as f:
        names = [line.strip() for line in f if line.strip()][shard::count]
    with open(args[1], "w") as out:
        for name in names:
            start = time.time()
            try:
                row = dump(name)
            except Exception as err:  # noqa: BLE001 - recorded, so both commits can be compared
                row = {"error": f"{type(err).__name__}: {err}"[:300]}
            out.write(json.dumps({"model": name, "seconds": round(time.time() - start, 2), **row}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
