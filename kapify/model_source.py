"""Where a model comes from (a timm or torchvision model name), so a checkpoint can rebuild it.

Read from the model alone, below everything else in kapify (``convert`` records it); building a model
from its source is :mod:`kapify.models.factory`'s."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional

from torch import nn

__all__ = ["describe_source", "torchvision_source", "SOURCE_ATTR"]

SOURCE_ATTR = "kapify_source"  # set by kapify.create_model: {"library", "name", "kwargs", "adapt"}


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
