"""Carry a trained kapify checkpoint between GPU sessions: bf16 shards small enough for the device tool.

A lent GPU machine starts bare each session and returns at most 8 files of 16 MiB (64 MiB in all) from
``$OUT``; a CIFAR ResNet18 checkpoint is 45-56 MB in float32. :func:`export_shards` writes its
floating-point tensors in bfloat16, split into files under ``max_bytes`` (the first keeps kapify's
metadata); :func:`import_shards` joins them back into one float32 checkpoint that ``kapify.load`` reads.
The model a later session attacks is the bf16-rounded one: score its clean accuracy there too.

    python benchmarks/bf16_shards.py export runs/kap_s0.1/model.safetensors $OUT/kap_s0.1
    python benchmarks/bf16_shards.py import .carry/kap_s0.1 runs/kap_s0.1/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, List

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MAX_BYTES = 15 * 2**20  # under the device tool's 16 MiB per file, with room for the header


def _shard_paths(stem: Path) -> List[Path]:
    return sorted(stem.parent.glob(f"{stem.name}.bf16-*.safetensors"))


def export_shards(checkpoint: Path, stem: Path, max_bytes: int = MAX_BYTES) -> List[Path]:
    """Write ``checkpoint``'s tensors (floats as bf16) to ``<stem>.bf16-NN.safetensors`` files of at most
    ``max_bytes``."""
    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(checkpoint))
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors, key=lambda k: -tensors[k].numel()):  # largest first: fewest shards
        t = tensors[name].to(torch.bfloat16) if tensors[name].is_floating_point() else tensors[name]
        nbytes = t.numel() * t.element_size()
        if nbytes > max_bytes:
            raise ValueError(f"{name} alone is {nbytes} bytes in bf16, over the {max_bytes}-byte shard limit")
        if size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    stem.parent.mkdir(parents=True, exist_ok=True)
    for old in _shard_paths(stem):
        old.unlink()
    paths = []
    for index, shard in enumerate(shards):
        path = stem.parent / f"{stem.name}.bf16-{index:02d}.safetensors"
        meta = (
            {**metadata, "bf16_shards": json.dumps({"index": index, "count": len(shards)})}
            if index == 0
            else {"bf16_shards": json.dumps({"index": index, "count": len(shards)})}
        )
        save_file(shard, str(path), metadata=meta)
        paths.append(path)
    return paths


def import_shards(stem: Path, checkpoint: Path) -> Path:
    """Join ``<stem>.bf16-NN.safetensors`` into one float32 checkpoint at ``checkpoint`` (kapify's metadata kept)."""
    paths = _shard_paths(stem)
    if not paths:
        raise FileNotFoundError(f"no shards {stem}.bf16-NN.safetensors")
    with safe_open(str(paths[0]), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    count = json.loads(metadata.pop("bf16_shards"))["count"]
    if len(paths) != count:
        raise ValueError(f"{stem}: {len(paths)} shard files, the first says {count}: copy all of them")
    tensors: Dict[str, torch.Tensor] = {}
    for path in paths:
        tensors.update({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, checkpoint)
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["export", "import"])
    parser.add_argument("source", type=Path, help="export: the checkpoint; import: the shards' stem")
    parser.add_argument("target", type=Path, help="export: the shards' stem; import: the checkpoint to write")
    args = parser.parse_args()
    if args.action == "export":
        print("\n".join(str(p) for p in export_shards(args.source, args.target)))
    else:
        print(import_shards(args.source, args.target))


if __name__ == "__main__":
    main()
