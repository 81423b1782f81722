"""The model an attack searches on: the evaluated model in a faster form that computes the same function.

An attack only *searches* for adversarial examples; :func:`kapify.evaluation.evaluate` scores every example
it returns on the evaluated model itself, in float32. So the search may run on a faster copy:

- ``fp32``: folded (:func:`kapify.fold`: noise layers removed, each KAP after a plain conv baked into the
  conv's filters, the same function in eval mode) and channels-last (oneDNN's fast conv layout);
- ``bf16``: the same, under bfloat16 autocast, logits returned in float32 (CPUs with native bf16 and CUDA).

On the §4.2 convnet (batch 250, one thread, 2-core AMD EPYC with AVX512-BF16) a forward + backward took
1008 ms as evaluated, 646 ms folded and channels-last (fp32), 306 ms in bf16 (``docs/evaluation.md``: how
AutoAttack's results compare on the two paths). A randomised defence (``test_noise``) is attacked as it is.
"""

from __future__ import annotations

import copy
from typing import Literal, get_args

import torch
from torch import nn

from ..precision import cpu_has_fast_bf16
from ..surgery.config import get_config
from ..surgery.fold import fold

__all__ = ["ATTACK_PRECISIONS", "AttackPrecision", "attack_model", "resolve_attack_precision"]

AttackPrecision = Literal["auto", "exact", "fp32", "bf16"]
ATTACK_PRECISIONS = get_args(AttackPrecision)


class _Autocast(nn.Module):
    """``model`` under autocast to ``dtype``; float32 logits."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x).float()


def resolve_attack_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CPU with native bf16 (where the search was measured to find the same examples:
    docs/evaluation.md), else ``fp32``; other values are returned as they are (``exact``: the model as evaluated).

    Example:
        >>> resolve_attack_precision("fp32", torch.device("cpu"))
        'fp32'
    """
    if precision not in ATTACK_PRECISIONS:
        raise ValueError(f"attack precision must be auto, exact, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def attack_model(model: nn.Module, precision: str, test_noise: bool = False) -> nn.Module:
    """The model the attacks search on, for ``precision`` (``exact``, ``fp32`` or ``bf16``; see the module).

    Example:
        >>> import kapify
        >>> kap = kapify.convert(kapify.models.SmallConvNet(depth=1, width=9), sigma=0.1).eval()
        >>> x = torch.rand(2, 3, 32, 32)
        >>> torch.allclose(attack_model(kap, "fp32")(x), kap(x), atol=1e-5)
        True
    """
    if precision == "exact" or test_noise:
        return model
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"attack precision must be exact, fp32 or bf16 here, got {precision!r}")
    config = get_config(model)
    faster = fold(model) if config is not None and not config.folded else copy.deepcopy(model)
    faster = faster.eval().to(memory_format=torch.channels_last)
    for p in faster.parameters():
        p.requires_grad_(False)  # attacks need input gradients only
    if precision == "bf16":
        device = next(model.parameters()).device
        faster = _Autocast(faster, device.type, torch.bfloat16).eval()
    return faster
