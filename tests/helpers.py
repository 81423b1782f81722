"""Plain helpers shared by several test modules (fixtures live in conftest.py, references in reference.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from kapify.surgery.conv_types import is_conv

ROOT = Path(__file__).resolve().parents[1]  # the repository


def state_snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed conversion must leave unchanged: tensors, module classes, train flags."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "hooks": len(model._forward_pre_hooks),
    }


def assert_unchanged(model: torch.nn.Module, snapshot: dict) -> None:
    now = state_snapshot(model)
    assert now["classes"] == snapshot["classes"] and now["training"] == snapshot["training"]
    assert now["hooks"] == snapshot["hooks"] and now["tensors"].keys() == snapshot["tensors"].keys()
    assert all(torch.equal(now["tensors"][k], v) for k, v in snapshot["tensors"].items())
    assert not hasattr(model, "kapify_config")


def called_convs(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """name -> (input, output) of every conv module an eager forward calls."""
    seen, handles = {}, []

    def record(name):
        def hook(module, inputs, output):
            if name not in seen:  # clone: later in-place ops (ReLU(inplace=True)) would change them
                seen[name] = (tuple(t.clone() for t in inputs), output.clone())

        return hook

    for name, module in model.named_modules():
        if is_conv(module):
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def without_layernorm(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm) or type(module).__name__.startswith("LayerNorm"):
            model.set_submodule(name, nn.Identity())
    return model


# the timm and torchvision models kapify's zoo tests convert (pooling, re-widening, TorchScript)
TIMM = [
    "resnet18",
    "resnet50",
    "resnet18d",
    "seresnet18",
    "wide_resnet50_2",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "convnext_tiny",
    "regnety_016",
    "densenet121",
    "vgg11_bn",
]
TORCHVISION = [
    "resnet18",
    "mobilenet_v2",
    "efficientnet_b0",
    "densenet121",
    "convnext_tiny",
    "vgg11_bn",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
]
CASES = [("timm", n) for n in TIMM] + [("torchvision", n) for n in TORCHVISION]
# the zoo models that take over 10 s a test on the 2-core machine: in the full run (CI) only
HEAVY = {
    ("timm", "vgg11_bn"),
    ("torchvision", "vgg11_bn"),
    ("timm", "wide_resnet50_2"),
    ("torchvision", "regnet_y_400mf"),
}
ZOO = [pytest.param(lib, n, id=f"{lib}-{n}", marks=[pytest.mark.slow] if (lib, n) in HEAVY else []) for lib, n in CASES]


def build(library: str, name: str) -> nn.Module:
    """A 10-class ``library`` ("timm" or "torchvision") model with random weights."""
    if library == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    return torchvision.models.get_model(name, weights=None, num_classes=10)
