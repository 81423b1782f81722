"""The model a recipe trains: factory model -> width -> small-image stem -> pixel-space input -> KAP."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..data import DatasetInfo
from ..model_source import create_model
from ..models import adapt
from ..surgery import convert
from .config import TrainConfig

__all__ = ["build_model", "width_kwargs"]

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
    """Build the model ``cfg`` describes for dataset ``info``: it takes [0,1] pixels (normalised
    inside), has the small-image stem on 32x32 data, and KAP/KMP/noise from :func:`kapify.convert`
    (``pool="none"`` with ``sigma=0`` is the plain NT model, with ``sigma>0`` NT(sigma)).
    Every step is recorded, so ``kapify.load`` rebuilds it from the checkpoint alone."""
    kwargs = {"num_classes": info.num_classes, **cfg.model_kwargs}
    kwargs.update(width_kwargs(cfg.model, cfg.width_mult, kwargs))
    try:
        model = create_model(cfg.model, **kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build {cfg.model!r} with {kwargs}: {err}") from err
    own_model = model.kapify_source["library"] == "kapify"
    small = cfg.small_image if cfg.small_image is not None else (info.image_size <= 32 and not own_model)
    if small:
        model = adapt(model, "small_image_stem")
    model = adapt(model, "normalize_input", mean=list(info.mean), std=list(info.std))
    return convert(
        model,
        k=cfg.kap_k,
        sigma=cfg.sigma,
        pool=None if cfg.pool == "none" else cfg.pool,
        stride=cfg.kap_stride,
        grid=cfg.grid,
        input_noise=cfg.input_noise,
        impl=cfg.kap_impl,
        example_input=torch.rand(1, 3, info.image_size, info.image_size),
    )
