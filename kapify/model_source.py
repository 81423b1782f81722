"""Where a model comes from (a timm or torchvision model name), so a checkpoint can rebuild it."""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

__all__ = ["create_model", "describe_source", "build_from_source", "SOURCE_ATTR"]

SOURCE_ATTR = "kapify_source"
_LIBRARIES = ("timm", "torchvision", "kapify")


def _split(name: str) -> tuple[Optional[str], str]:
    library, sep, arch = name.partition("/")
    if sep and library in _LIBRARIES:
        return library, arch
    return None, name


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a timm or torchvision model by name and remember how, for :func:`kapify.save`.

    ``name`` is ``"timm/<arch>"``, ``"torchvision/<arch>"``, ``"kapify/small_convnet"`` or a bare
    name (timm first, then torchvision). ``kwargs`` go to the library's factory (``num_classes=10``, ...).

    Example:
        >>> model = create_model("torchvision/resnet18", num_classes=10)
        >>> model.kapify_source["library"], model.fc.out_features
        ('torchvision', 10)
    """
    library, arch = _split(name)
    if library is None:
        import timm

        library = "timm" if timm.is_model(arch) else "torchvision"
    source = {"library": library, "name": arch, "kwargs": dict(kwargs)}
    model = build_from_source(source, pretrained=pretrained)
    setattr(model, SOURCE_ATTR, source)
    return model


def build_from_source(source: Dict[str, Any], pretrained: bool = False) -> nn.Module:
    """Build the plain model that ``source`` (from :func:`describe_source`) names, with its
    recorded adaptations (``source["adapt"]``, see :func:`kapify.models.adapt`) replayed."""
    from .models.adapt import ADAPTATIONS

    model = _build_arch(source, pretrained)
    for step in source.get("adapt") or []:
        options = {k: v for k, v in step.items() if k != "name"}
        if step.get("name") not in ADAPTATIONS:
            raise ValueError(f"the model source names an unknown adaptation {step.get('name')!r}; registered: {sorted(ADAPTATIONS)}")
        model = ADAPTATIONS[step["name"]](model, **options)
    return model


def _build_arch(source: Dict[str, Any], pretrained: bool) -> nn.Module:
    library, arch, kwargs = source.get("library"), source.get("name"), dict(source.get("kwargs") or {})
    if library == "kapify":
        from .models import MODELS

        if arch not in MODELS:
            raise ValueError(f"kapify has no model named {arch!r}; kapify models: {sorted(MODELS)}")
        return MODELS[arch](**kwargs)
    if library == "timm":
        import timm

        if not timm.is_model(arch):
            raise ValueError(f"timm has no model named {arch!r}; see timm.list_models()")
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    if library == "torchvision":
        import torchvision

        if arch not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no model named {arch!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None, **kwargs)
    raise ValueError(f"cannot build a model from source {source!r}: library must be 'timm', 'torchvision' or 'kapify'")


def describe_source(model: nn.Module) -> Optional[Dict[str, Any]]:
    """How to rebuild ``model`` without weights, or None when it cannot be told from the model.

    Models made by :func:`create_model` carry their source; timm models tell their architecture
    through ``pretrained_cfg``. A torchvision model's builder name is not recorded by
    torchvision, so build those with :func:`create_model` to save them with :func:`kapify.save`.
    """
    source = getattr(model, SOURCE_ATTR, None)
    if source is not None:
        return source
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if type(model).__module__.startswith("timm.") and "architecture" in cfg:
        kwargs: Dict[str, Any] = {}
        if hasattr(model, "num_classes"):
            kwargs["num_classes"] = model.num_classes
        first_conv = cfg.get("first_conv")
        if isinstance(first_conv, str):
            try:
                kwargs["in_chans"] = model.get_submodule(first_conv).in_channels
            except AttributeError:
                pass
        return {"library": "timm", "name": cfg["architecture"], "kwargs": kwargs}
    return None
