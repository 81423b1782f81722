"""Where a model comes from (a timm or torchvision model name), so a checkpoint can rebuild it."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional

from torch import nn

__all__ = ["create_model", "describe_source", "build_from_source", "torchvision_source", "SOURCE_ATTR"]

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
            raise ValueError(
                f"the model source names an unknown adaptation {step.get('name')!r}; registered: {sorted(ADAPTATIONS)}"
            )
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


def describe_source(model: nn.Module, in_chans: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """How to rebuild ``model`` without weights, or None when it cannot be told from the model.

    Models made by :func:`create_model` carry their source; timm models tell their architecture
    through ``pretrained_cfg`` (``in_chans``: the channels of the input it runs on; else the first conv's,
    which is wrong after a space-to-depth stem such as TResNet's); a torchvision model is recognised among
    torchvision's builders by its class and parameter shapes (:func:`torchvision_source`).
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
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        elif isinstance(first_conv, str):
            try:
                kwargs["in_chans"] = model.get_submodule(first_conv).in_channels
            except AttributeError:
                pass
        return {"library": "timm", "name": cfg["architecture"], "kwargs": kwargs}
    if type(model).__module__.startswith("torchvision.models"):
        return torchvision_source(model)
    return None


def _shapes(model: nn.Module) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter and buffer moved to the meta device as it is registered
    (for builders that compute sizes with tensors, which the meta device cannot ``.item()``)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer(module: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def _build_shapes_only(builder: Callable[..., nn.Module], kwargs: Dict[str, Any]) -> Optional[Dict[str, tuple]]:
    import torch

    for context in (lambda: torch.device("meta"), _parameters_on_meta):
        try:
            with context():
                return _shapes(builder(weights=None, **kwargs))
        except Exception:  # cannot build this way, or the builder takes no such kwargs
            continue
    return None


def torchvision_source(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The torchvision builder (and ``num_classes``) that makes a model of ``model``'s class and
    parameter shapes, or None. torchvision does not record which builder made a model, so the
    builders whose return type is ``type(model)`` are built on the meta device (no memory, no
    init cost) and their shapes compared.

    Example:
        >>> import torchvision
        >>> torchvision_source(torchvision.models.resnet34(num_classes=10))
        {'library': 'torchvision', 'name': 'resnet34', 'kwargs': {'num_classes': 10}}
    """
    import inspect

    import torchvision

    want = _shapes(model)
    heads = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    num_classes = heads[-1].out_features if isinstance(heads[-1], nn.Linear) else heads[-1].out_channels
    for name in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(name)
        if inspect.signature(builder).return_annotation is not type(model):
            continue
        for kwargs in ({"num_classes": num_classes}, {}):
            if _build_shapes_only(builder, kwargs) == want:
                return {"library": "torchvision", "name": name, "kwargs": kwargs}
    return None
