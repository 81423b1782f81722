"""Which precision and memory format a run uses: bf16 autocast + channels_last where the device runs
them fast (CUDA; CPUs with AMX or AVX512-BF16, detected from the CPU flags), fp32 elsewhere."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = ["Precision", "cpu_has_fast_bf16", "resolve_precision"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True if this CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


@dataclass(frozen=True)
class Precision:
    """What actually runs: ``amp`` (bf16, fp16 or none), its autocast dtype, loss scaling, memory format."""

    amp: str
    channels_last: bool

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return _DTYPES[self.amp]

    @property
    def grad_scaler(self) -> bool:
        return self.amp == "fp16"

    @property
    def name(self) -> str:
        """The compute precision: ``fp32``, ``bf16`` or ``fp16``."""
        return "fp32" if self.amp == "none" else self.amp

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def describe(self) -> str:
        return f"{self.name}, {self.memory_format}"


def resolve_precision(amp: str, channels_last: Optional[bool], device: torch.device) -> Precision:
    """Resolve ``amp="auto"`` and ``channels_last=None`` for ``device``.

    auto means bf16 on CUDA and on CPUs with native bf16 (:func:`cpu_has_fast_bf16`), fp32
    elsewhere; channels_last defaults to on wherever bf16 runs (oneDNN and cuDNN pick their fast
    kernels for NHWC), off in fp32 on a CPU.

    Example:
        >>> resolve_precision("none", None, torch.device("cpu"))
        Precision(amp='none', channels_last=False)
    """
    if amp not in ("auto", *_DTYPES):
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {amp!r}")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()) else "none"
    if channels_last is None:
        channels_last = device.type == "cuda" or amp == "bf16"
    return Precision(amp, bool(channels_last))
