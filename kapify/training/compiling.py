"""Whether and how a run compiles its model with ``torch.compile``.

``auto`` is meant to compile on CUDA, where a CIFAR ResNet18 step is launch-bound when eager (~11 ms per
step of 512 images on an H200 against far less arithmetic), with ``reduce-overhead``: inductor's fused
kernels replayed as CUDA graphs. That compiled trainer has not yet run on a GPU (issue 30's check: eager and
compiled losses equal within bf16 tolerance over 50 steps), so until :data:`CUDA_COMPILE_CHECKED` is set by
that check ``auto`` stays eager on CUDA too; name a mode to compile anyway.

On a CPU ``auto`` stays eager: on a 2-core Xeon (CIFAR ResNet18, batch 64,
bf16, train step; docs/overhead.md) compiling made the plain model 0.93x as slow, but KAP(σ=0.1)
3.1x slower than eager (inductor's CPU noise costs ~24 ns per element, kapify's eager CPU noise
kernel ~1 ns); on a 2-core AMD EPYC (AVX512-BF16) the §4.2 convnet's plain training step compiled ran at
0.60x eager's speed (1525 vs 2529 images/s, bf16, batch 128, 2 threads). Converted models compile in one
graph, noise included (``tests/test_compile.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["COMPILE_MODES", "CUDA_COMPILE_CHECKED", "resolve_compile", "compile_model"]

# Set to True once the compiled-trainer check (docs/training.md, "Compiled training") has passed on a GPU.
CUDA_COMPILE_CHECKED = False

# torch.compile's modes, plus "off" and "auto"
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_compile(compile: object, device: torch.device, objective: str = "standard") -> Optional[str]:
    """The ``torch.compile`` mode a run uses on ``device``, or None for eager.

    ``auto`` compiles only the ``standard`` objective: adversarial training attacks the model in eval
    mode inside each step, which would switch the compiled graphs back and forth (not measured; ask
    for a mode explicitly to try it). Accepts the YAML booleans of older configs (true: ``default``,
    false: ``off``).

    Example:
        >>> cpu = torch.device("cpu")
        >>> resolve_compile("auto", cpu) is None, resolve_compile("reduce-overhead", cpu)
        (True, 'reduce-overhead')
    """
    if isinstance(compile, bool):
        compile = "default" if compile else "off"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {list(COMPILE_MODES)} (or true/false), got {compile!r}")
    if compile == "auto":
        on_cuda = device.type == "cuda" and objective == "standard" and CUDA_COMPILE_CHECKED
        return "reduce-overhead" if on_cuda else None
    return None if compile == "off" else str(compile)


def compile_model(model: nn.Module, mode: Optional[str]) -> nn.Module:
    """``torch.compile(model, mode=mode)``, or ``model`` itself when ``mode`` is None.

    Shapes are static (``dynamic=False``): a run's batches have one size, and a graph specialised to
    it is what CUDA graphs replay.
    """
    if mode is None:
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
