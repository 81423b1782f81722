"""Dump the channel graph (groups, layouts, constraints) of models as JSON lines, to diff two commits.

Used to check that a refactor of ``kapify.surgery.channels`` keeps behaviour: run it on both
commits with the same model list and compare the files (``seconds`` aside).

    python scripts/channel_graph_dump.py models.txt graphs.jsonl     # models.txt: timm names or torchvision/<name>
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch


def dump(name: str) -> dict:
    import timm
    import torchvision

    from kapify.surgery.channels import analyze_channels
    from kapify.surgery.tracing import example_input

    model = (
        torchvision.models.get_model(name.split("/")[1], weights=None)
        if name.startswith("torchvision/")
        else timm.create_model(name, pretrained=False)
    ).eval()
    graph = analyze_channels(model, example_input(model))
    return {
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


def main() -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        names = [line.strip() for line in f if line.strip()]
    with open(sys.argv[2], "w") as out:
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
