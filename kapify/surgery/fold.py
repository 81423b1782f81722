"""``kapify.fold``: a deployable copy with every foldable KAP baked into plain conv weights."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..layers.input_stage import remove_input_stage
from .config import CONFIG_ATTR, INPUT_NOISE_ATTR, get_config
from .kap_conv import detach_kap, is_kap_conv, weight_poolable

__all__ = ["fold"]


def fold(model: nn.Module) -> nn.Module:
    """Return a copy of a converted model for inference: noise layers removed, and every average
    pool that follows a plain ungrouped conv baked into that conv's weights (it becomes a plain
    ``nn.Conv2d`` again). Other pools (KMP, after grouped/custom convs) stay as activation ops.
    In eval mode the outputs equal the converted model's; the copy exports with ``torch.export``.

    Example:
        >>> import timm, kapify
        >>> kap = kapify.convert(timm.create_model("resnet18", num_classes=10)).eval()
        >>> folded = kapify.fold(kap)
        >>> x = torch.ones(1, 3, 32, 32)
        >>> type(folded.conv1).__name__, torch.allclose(folded(x), kap(x), atol=1e-4)
        ('Conv2d', True)
    """
    config = get_config(model)
    if config is None:
        raise ValueError(f"{type(model).__name__} was not converted by kapify.convert; there is nothing to fold")
    if config.folded:
        raise ValueError("this model is already folded")
    new = copy.deepcopy(model)
    layers = []
    for record in config.layers:
        conv = new.get_submodule(record.name)
        if not is_kap_conv(conv):
            layers.append(record)
            continue
        conv.kap_noise = None
        if weight_poolable(conv, conv.kap_pool):
            with torch.no_grad():
                weight, bias = conv.pooled_weight()
            detach_kap(conv)
            conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
            if bias is not None:
                conv.bias = nn.Parameter(bias, requires_grad=conv.bias.requires_grad)
            conv.out_channels = weight.shape[0]
            record = dataclasses.replace(record, impl="folded")
        elif conv.kap_pool is None:
            detach_kap(conv)
        else:
            conv.kap_impl = "activation"
        layers.append(dataclasses.replace(record, sigma=0.0))
    remove_input_stage(new, INPUT_NOISE_ATTR)
    setattr(new, CONFIG_ATTR, dataclasses.replace(config, layers=layers, folded=True))
    return new
