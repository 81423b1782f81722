"""Build a model from its name or from a recorded source (:mod:`kapify.model_source`), adaptations replayed."""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from ..model_source import SOURCE_ATTR
from .adapt import ADAPTATIONS
from .small_convnet import small_convnet

__all__ = ["MODELS", "build_from_source", "create_model"]

#: kapify's own architectures, built by ``kapify.create_model("kapify/<name>", **kwargs)``.
MODELS = {
    "small_convnet": small_convnet,  # §4.2: 1-3 conv-BN-ReLU blocks (depth, kernel-size multiplier, sigma studies)
}
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
    model = _build_arch(source, pretrained)
    for step in source.get("adapt") or []:
        options = {k: v for k, v in step.items() if k != "name"}
        if step.get("name") not in ADAPTATIONS:
            raise ValueError(
                f"the model source names an unknown adaptation {step.get('name')!r}; registered: {sorted(ADAPTATIONS)}"
            )
        model = ADAPTATIONS[step["name"]](model, **options)
    return model


def _build_arch(source: Dict[str, Any], pretrained: bool) -> nn.Module:
    library, arch, kwargs = source.get("library"), source.get("name"), dict(source.get("kwargs") or {})
    if library == "kapify":
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
