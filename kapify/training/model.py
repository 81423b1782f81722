"""The model a recipe trains: factory model -> width -> small-image stem -> pixel-space input -> KAP."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..data import DatasetInfo
from ..models import adapt
from ..models.factory import create_model
from ..surgery import convert
from .config import TrainConfig

__all__ = ["build_model", "build_plain_model", "load_initial_weights", "width_kwargs"]

_RESNET_CHANNELS = (64, 128, 256, 512)


def width_kwargs(model: str, width_mult: float, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Factory keyword arguments that widen ``model`` by ``width_mult`` (the paper's RN18WideX4 is
    ``width_mult=4``). Supported: timm ResNets (``channels``/``stem_width``) and kapify/small_convnet."""
    if width_mult == 1:
        return {}
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    scale = lambda c: max(1, int(round(c * width_mult)))  # noqa: E731
    if model.removeprefix("kapify/") == "small_convnet":
        width = kwargs.get("width", 64)
        return {"width": scale(width) if isinstance(width, int) else [scale(w) for w in width]}
    import timm

    name = model.removeprefix("timm/")
    if timm.is_model(name) and timm.models.model_entrypoint(name).__module__ == "timm.models.resnet":
        return {"channels": tuple(scale(c) for c in _RESNET_CHANNELS), "stem_width": scale(64)}
    raise ValueError(
        f"width_mult={width_mult} is supported for timm ResNets and kapify/small_convnet, not {model!r}; "
        f"widen other models through their own factory arguments (--model-kwargs)"
    )


def build_model(cfg: TrainConfig, info: DatasetInfo) -> nn.Module:
    """Build the model ``cfg`` describes for dataset ``info``: :func:`build_plain_model`, then KAP/KMP/noise
    from :func:`kapify.convert` (``pool="none"`` with ``sigma=0`` is the plain NT model, with ``sigma>0``
    NT(sigma)). Every step is recorded, so ``kapify.load`` rebuilds it from the checkpoint alone."""
    model = build_plain_model(cfg, info)
    example = torch.rand(1, 3, info.image_size, info.image_size)
    warm_start = cfg.kap_warmup_epochs > 0 and cfg.pool == "avg"
    return convert(
        model,
        k=cfg.kap_k,
        sigma=cfg.sigma,
        pool=None if cfg.pool == "none" else cfg.pool,
        stride=cfg.kap_stride,
        grid=cfg.grid,
        input_noise=cfg.input_noise,
        impl=cfg.kap_impl,
        example_input=example,
        blend=0.0 if warm_start else 1.0,
        arrange=cfg.arrange,
    )


def build_plain_model(cfg: TrainConfig, info: DatasetInfo) -> nn.Module:
    """The unconverted model: factory model (``--pretrained`` weights if asked) -> width -> small-image
    stem on 32x32 data -> [0,1]-pixel input (normalised inside) -> ``--initial-checkpoint`` weights."""
    kwargs = {"num_classes": info.num_classes, **cfg.model_kwargs}
    kwargs.update(width_kwargs(cfg.model, cfg.width_mult, kwargs))
    try:
        model = create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build {cfg.model!r} with {kwargs}: {err}") from err
    own_model = model.kapify_source["library"] == "kapify"
    small = cfg.small_image if cfg.small_image is not None else (info.image_size <= 32 and not own_model)
    if small:
        model = adapt(model, "small_image_stem")
    model = adapt(model, "normalize_input", mean=list(info.mean), std=list(info.std))
    if cfg.initial_checkpoint:
        load_initial_weights(model, cfg.initial_checkpoint)
    return model


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Load ``path`` into the plain (not yet converted) ``model``: a kapify checkpoint (``kapify.save``:
    its weights, which have the plain model's keys) or a plain state_dict (safetensors, or a torch
    file holding the dict itself or under "state_dict" / "model"). Anything that does not fit is an
    error that says what differs."""
    from pathlib import Path

    from .. import serialization

    if not Path(path).is_file():
        raise FileNotFoundError(f"--initial-checkpoint {path}: no such file")
    try:
        state = serialization.load(path).state_dict()
    except serialization.NotACheckpointError:  # a plain state_dict in safetensors
        from safetensors.torch import load_file

        state = load_file(path)
    except ValueError as err:  # not safetensors at all: a torch file, else a corrupt safetensors file
        if str(path).endswith(".safetensors"):
            raise ValueError(f"--initial-checkpoint {path}: {err}") from err
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            state = state.get("state_dict", state.get("model", state))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"--initial-checkpoint {path} does not fit the model ({type(model).__name__}): "
            + "; ".join(
                part
                for part in (
                    f"missing {len(missing)} key(s), e.g. {missing[:3]}" if missing else "",
                    f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}" if unexpected else "",
                    f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:2]}" if mismatched else "",
                )
                if part
            )
            + ". Use the same --model, --model-kwargs, --width-mult and --small-image as the run that wrote it "
            "(a square-widened kapify checkpoint only fits the widened model)"
        )
    model.load_state_dict(state)
