"""The record of a conversion, kept on the converted model as ``model.kapify_config``.

It is small and JSON-serialisable, so that :func:`kapify.save` / :func:`kapify.load` can rebuild the
same architecture from the model's source (a timm or torchvision model name) without user code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from torch import nn

__all__ = ["LayerRecord", "KapConfig", "get_config", "is_converted", "unwrap", "require_module", "CONFIG_ATTR"]
__all__ += ["INPUT_NOISE_ATTR"]

CONFIG_ATTR = "kapify_config"  # the model attribute holding its KapConfig
INPUT_NOISE_ATTR = "kapify_input_noise"  # the model attribute naming its input-noise stage


@dataclass
class LayerRecord:
    """What was placed after one convolution."""

    name: str
    conv_class: str
    in_channels: int
    out_channels: int
    pooled_channels: int
    grid: Optional[str]  # "RxC" of the pooled channels, None when no pool
    kernel_size: int
    stride: int
    pool: Optional[str]
    sigma: float
    route: str  # how the conv was found: "graph" or "inside leaf <Type>"
    # where the pool runs: "activation", "weight", "auto" (the smaller of the two per call) or "folded"
    impl: str = "activation"
    neighbour_similarity: Optional[List[float]] = (
        None  # arrange: mean cosine similarity of grid-neighbour filters, [before, after]
    )


@dataclass
class KapConfig:
    """Options of a :func:`kapify.convert` call and what it did, layer by layer."""

    k: int
    stride: int
    sigma: float
    pool: Optional[str]
    grid: str
    input_noise: bool
    impl: str = "auto"
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    layers: List[LayerRecord] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    params_before: int = 0
    source: Optional[Dict[str, Any]] = None
    folded: bool = False
    fixed_widths: Dict[str, str] = field(default_factory=dict)  # grid="square": conv -> why its width stayed
    widened_across_norm: List[str] = field(
        default_factory=list
    )  # grid="square": convs widened across a LayerNorm/GroupNorm
    input_shape: Optional[List[int]] = (
        None  # the example input's shape, when one was given (load repeats the analysis on it)
    )
    arrange: Optional[str] = None  # channel arrangement applied before pooling (the weights are stored arranged)
    blend: float = 1.0  # KAP warm-start: (1 - blend) conv + blend KAP (kapify.set_blend)
    # what kapify.load replays without tracing: the re-widening ("widths", see kapify.surgery.rewiden.width_record)
    # and the module that reads the input ("entry"); None in checkpoints of version 2 and before (load converts again)
    plan: Optional[Dict[str, Any]] = None
    version: int = 3  # 2: spare filters for fixed widths, a group grows at most 2x; 3: the plan is stored

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "KapConfig":
        data = dict(data)
        data["layers"] = [LayerRecord(**layer) for layer in data.get("layers", [])]
        return cls(**data)


def require_module(model: Any) -> None:
    """Refuse anything but an ``nn.Module`` with what to pass instead (a model name is the common slip)."""
    if not isinstance(model, nn.Module):
        hint = (
            f": build the model first, e.g. kapify.create_model({model!r}) or timm.create_model({model!r})"
            if isinstance(model, str)
            else ""
        )
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}{hint}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (``.module``) / torch.compile (``._orig_mod``) wrappers."""
    require_module(model)
    while not hasattr(model, CONFIG_ATTR):
        inner = next(
            (getattr(model, a) for a in ("module", "_orig_mod") if isinstance(getattr(model, a, None), nn.Module)), None
        )
        if inner is None:
            break
        model = inner
    return model


def get_config(model: nn.Module) -> Optional[KapConfig]:
    """The :class:`KapConfig` of a converted model (unwrapping DDP / torch.compile), else None."""
    return getattr(unwrap(model), CONFIG_ATTR, None)


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` was returned by :func:`kapify.convert`."""
    return get_config(model) is not None
