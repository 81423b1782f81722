"""Decoded images cached as one uint8 tensor file, keyed by a checksum of the source files.

Decoding 60,000 CIFAR JPEGs takes tens of seconds on a small CPU; every run after the first loads
``(N, H, W, 3)`` uint8 images and their labels from ``<cache dir>/<name>-<split>-<source checksum>.pt``
instead. The file also holds a checksum of its own contents: a truncated or altered cache is detected,
reported and rebuilt, never used. A source that changes gets a new checksum and so a new file.

The cache dir is ``$KAPIFY_CACHE_DIR``, else ``~/.cache/kapify``; where it cannot be written the
images are decoded each time (with a warning).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch

from ..files import CACHE_DIR_ENV, cache_dir

__all__ = ["source_checksum", "cached_decode"]

Decoded = Tuple[np.ndarray, List[int], List[str]]


def source_checksum(paths: Sequence[Path]) -> str:
    """SHA-256 over the names and bytes of ``paths`` (files, or folders walked in sorted order)."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in Path(root).rglob("*") if p.is_file()) if Path(root).is_dir() else [Path(root)]
        for path in files:
            digest.update(str(path.relative_to(root) if path != Path(root) else path.name).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _content_checksum(images: torch.Tensor, labels: torch.Tensor, classes: List[str]) -> str:
    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    digest.update("\n".join(classes).encode())
    return digest.hexdigest()


def _load(path: Path) -> Decoded:
    """The cached arrays, or ``ValueError`` if the file is not a complete, unaltered cache."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images, labels, classes = blob["images"], blob["labels"], list(blob["classes"])
        stored = blob["checksum"]
    except Exception as err:  # truncated zip, wrong pickle, missing keys: all mean 'corrupt'
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from None
    if images.dtype != torch.uint8 or images.dim() != 4 or len(labels) != len(images):
        raise ValueError("unexpected array shapes or types")
    if _content_checksum(images, labels, classes) != stored:
        raise ValueError("contents do not match their checksum")
    return images.numpy(), labels.tolist(), classes


def _save(path: Path, decoded: Decoded) -> None:
    images = torch.from_numpy(np.ascontiguousarray(decoded[0]))
    labels = torch.tensor(decoded[1], dtype=torch.int64)
    blob = {
        "images": images,
        "labels": labels,
        "classes": list(decoded[2]),
        "checksum": _content_checksum(images, labels, list(decoded[2])),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half file under the final name


def cached_decode(name: str, split: str, sources: Sequence[Path], decode: Callable[[], Decoded]) -> Decoded:
    """``decode()``'s ``(images uint8 (N, H, W, 3), labels, classes)``, through the cache.

    The cache file is named after ``name``, ``split`` and the checksum of ``sources`` (the files
    ``decode`` reads), so it is rebuilt when they change; a corrupt file is rebuilt with a warning.
    """
    path = cache_dir() / f"{name}-{split}-{source_checksum(sources)[:16]}.pt"
    if path.is_file():
        try:
            return _load(path)
        except ValueError as err:
            warnings.warn(
                f"kapify: ignoring the corrupt dataset cache {path} ({err}); decoding the source again", stacklevel=2
            )
    decoded = decode()
    try:
        _save(path, decoded)
    except OSError as err:
        warnings.warn(
            f"kapify: cannot write the dataset cache {path} ({err}); set ${CACHE_DIR_ENV} to a writable folder "
            f"to skip decoding next time",
            stacklevel=2,
        )
    return decoded
