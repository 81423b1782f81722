"""``kapify.save`` / ``kapify.load``: safetensors weights with the conversion config as JSON metadata."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from .files import PathLike, write_atomically
from .models.factory import build_from_source
from .surgery.config import KapConfig, get_config, unwrap
from .surgery.conversion_plan import ConvertOptions
from .surgery.convert import convert, replay
from .surgery.fold import fold

__all__ = ["save", "load", "load_config", "load_extra", "NotACheckpointError"]

_CONFIG_KEY = "kapify.config"
_EXTRA_KEY = "kapify.extra"


class NotACheckpointError(ValueError):
    """A readable safetensors file without kapify's conversion metadata (e.g. a plain state_dict)."""


def save(model: nn.Module, path: PathLike, extra: Optional[Dict[str, Any]] = None) -> None:
    """Save a converted model's weights and conversion config to one ``.safetensors`` file.

    ``extra`` is any JSON-serialisable dict (training args, metrics) stored beside the config. Any
    converted model can be saved; one whose architecture kapify cannot name (not timm, torchvision
    or :func:`kapify.create_model`) is loaded back with ``kapify.load(path, model=plain_model)``.
    The file is written to a temporary name first, so a crash never leaves a truncated checkpoint.

    Example:
        >>> import kapify
        >>> model = kapify.convert(kapify.create_model("resnet18", num_classes=10))
        >>> kapify.save(model, "/tmp/kap.safetensors")
        >>> restored = kapify.load("/tmp/kap.safetensors")
    """
    model = unwrap(model)
    config = get_config(model)
    if config is None:
        raise ValueError(f"{type(model).__name__} was not converted by kapify.convert; save it with torch.save instead")
    metadata = {_CONFIG_KEY: json.dumps(config.to_dict())}
    if extra is not None:
        metadata[_EXTRA_KEY] = json.dumps(extra)
    write_atomically(path, lambda tmp: save_model(model, tmp, metadata=metadata), "kapify checkpoint")


def _metadata(path: PathLike) -> Dict[str, str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no kapify checkpoint at {os.fspath(path)!r}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{os.fspath(path)!r} is not a readable safetensors file ({err}); is it corrupt or truncated?"
        ) from err
    if _CONFIG_KEY not in metadata:
        raise NotACheckpointError(
            f"{os.fspath(path)!r} is a safetensors file but not a kapify checkpoint (no '{_CONFIG_KEY}' metadata)"
        )
    return metadata


def load_config(path: PathLike) -> KapConfig:
    """The :class:`KapConfig` stored in a checkpoint written by :func:`save`."""
    return KapConfig.from_dict(json.loads(_metadata(path)[_CONFIG_KEY]))


def load_extra(path: PathLike) -> Optional[Dict[str, Any]]:
    """The ``extra`` dict stored by :func:`save`, or None."""
    raw = _metadata(path).get(_EXTRA_KEY)
    return None if raw is None else json.loads(raw)


def load(path: PathLike, model: Optional[nn.Module] = None, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild a converted model from a checkpoint written by :func:`save`.

    The plain model is built from the recorded timm/torchvision source (or pass the unconverted
    ``model`` yourself) and converted by replaying the stored plan (no tracing; a checkpoint written
    before plans were stored is converted again with the recorded options), checked layer by layer
    against the record, and the weights are loaded strictly.
    """
    config = load_config(path)
    built = model is None  # a model load builds itself may be converted in place: one copy less in memory
    if model is None:
        if config.source is None:
            raise ValueError(
                f"{os.fspath(path)!r} holds a model kapify cannot rebuild by name (not a timm, torchvision or "
                f"kapify.create_model model): pass the unconverted model, kapify.load(path, model=plain_model)"
            )
        model = build_from_source(config.source)
    if config.plan is not None:
        converted = replay(model, config, inplace=built)
    else:
        # a record without a stored plan (version 2 and before): convert again with its options; the stored weights
        # are already arranged, so a fresh model is not arranged first
        options = dataclasses.replace(ConvertOptions.of(config), arrange=None)
        example = None if config.input_shape is None else torch.rand(config.input_shape)
        converted = convert(model, **dataclasses.asdict(options), example_input=example)
    if config.folded:
        converted = fold(converted)
    got = [(r.name, r.grid, r.out_channels) for r in get_config(converted).layers]
    want = [(r.name, r.grid, r.out_channels) for r in config.layers]
    for recorded, rebuilt in itertools.zip_longest(want, got):
        if recorded != rebuilt:
            older = get_config(converted).version != config.version
            raise ValueError(
                f"the rebuilt model does not match the checkpoint's recorded layers (first difference: recorded "
                f"{recorded}, rebuilt {rebuilt}); "
                + (
                    f"the checkpoint was written by a kapify whose conversion differs (config version "
                    f"{config.version}, "
                    f"this kapify writes {get_config(converted).version}): load it with that kapify version"
                    if older
                    else "did the timm/torchvision version or the model source change?"
                )
            )
    get_config(converted).source = config.source
    _load_weights(converted, path, device)
    return converted.to(device)


def _load_weights(model: nn.Module, path: PathLike, device: Union[str, torch.device]) -> None:
    """Load the checkpoint's tensors into ``model`` strictly, with the rebuilt model's state_dict metadata
    (the per-module versions that e.g. torchvision's MNASNet reads in ``_load_from_state_dict``; a
    safetensors file keeps tensors only). Tensors ``save`` left out as duplicates of a shared one
    (tied weights) are taken from the tensor they share."""
    own = model.state_dict()
    stored = load_file(os.fspath(path), device=str(device))
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict(stored)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    aliases: Dict[tuple, List[str]] = {}  # names of one tensor (tied weights): save_model stores one of them
    for name, tensor in own.items():
        aliases.setdefault(
            (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)), []
        ).append(name)
    dropped = {
        name for names in aliases.values() if any(n in stored for n in names) for name in names if name not in stored
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dropped]
    if missing or unexpected:
        raise RuntimeError(
            f"{os.fspath(path)!r} does not fit the rebuilt model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
