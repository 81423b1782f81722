"""Additive Gaussian noise, on in training only (paper §4.1), and the switch for test-time noise."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from .fast_noise import add_gaussian
from .input_stage import input_stages

__all__ = ["GaussianNoise", "set_noise", "check_sigma", "gaussian_like"]

NoiseSite = Literal["all", "input", "activation"]


def check_sigma(sigma: float) -> float:
    """Return ``sigma`` as a float if it is a finite number >= 0, else raise a ``ValueError``."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"sigma must be a number >= 0, got {sigma!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"sigma is the standard deviation of the noise and must be finite and >= 0, got {sigma!r}")
    return value


@torch.jit.unused  # sorts strides with a lambda; scripted noise takes the plain path (GaussianNoise.forward)
def gaussian_like(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """I.i.d. N(0, sigma^2) noise with the shape, dtype, device and memory layout of ``x``.

    The numbers are drawn through a contiguous view of the new buffer: ``normal_`` on a strided
    (e.g. channels_last) tensor takes a slow element-wise path, 5x slower on a CPU, although the
    order in which i.i.d. numbers are written does not matter.

    Example:
        >>> x = torch.zeros(2, 8, 4, 4).to(memory_format=torch.channels_last)
        >>> n = gaussian_like(x, 0.1)
        >>> n.is_contiguous(memory_format=torch.channels_last), n.shape == x.shape
        (True, True)
    """
    noise = torch.empty_like(x)
    order = sorted(range(noise.dim()), key=lambda d: noise.stride(d), reverse=True)
    dense = noise.permute(order)
    (dense if dense.is_contiguous() else noise).normal_(0.0, sigma)
    return noise


class GaussianNoise(nn.Module):
    """Add N(0, sigma^2) noise in training mode; identity in eval mode unless test-time noise is on.

    ``site`` says where the noise sits ("input" or "activation") so that :func:`set_noise` can
    switch the two separately, as the paper's Table 2 does.

    Example:
        >>> noise = GaussianNoise(0.1).eval()
        >>> x = torch.ones(2, 3)
        >>> bool((noise(x) == x).all())
        True
    """

    def __init__(self, sigma: float, site: Literal["input", "activation"] = "activation") -> None:
        super().__init__()
        self.sigma = check_sigma(sigma)
        self.site = site
        self.test_time = False

    def forward(self, x: torch.Tensor, reuse_input: bool = False) -> torch.Tensor:
        """``x`` plus noise. ``reuse_input=True``: nothing else holds ``x`` (e.g. a conv's fresh output inside
        a Kap conv), so the sum may be written into it."""
        if self.sigma == 0 or not (self.training or self.test_time):
            return x
        if torch.jit.is_scripting():  # TorchScript (kapify.surgery.scripting): the plain expression
            return x + torch.randn_like(x) * self.sigma
        # on a CPU: kapify's compiled generator, drawing and adding in one multi-threaded pass (fast_noise.py)
        fast = add_gaussian(x, self.sigma, reuse_input=reuse_input)
        if fast is not None:
            return fast
        # elsewhere (CUDA, torch.compile, no C compiler): one RNG pass into a new buffer, then one add
        return gaussian_like(x, self.sigma).add_(x)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, site={self.site}" + (", test_time=True" if self.test_time else "")


def set_noise(model: nn.Module, enabled: bool, site: NoiseSite = "all", sigma: Optional[float] = None) -> int:
    """Switch test-time noise on or off for the noise layers of ``model`` at ``site``.

    With ``enabled=True`` noise is added in eval mode too (training mode always adds it);
    ``sigma`` optionally sets a new standard deviation. Returns the number of layers changed.

    Example:
        >>> model = nn.Sequential(GaussianNoise(0.1, site="input"), nn.Flatten())
        >>> set_noise(model, True, site="input")
        1
    """
    if site not in ("all", "input", "activation"):
        raise ValueError(f"site must be 'all', 'input' or 'activation', got {site!r}")
    new_sigma = None if sigma is None else check_sigma(sigma)
    changed = 0
    for module in list(model.modules()) + input_stages(model):
        if isinstance(module, GaussianNoise) and site in ("all", module.site):
            module.test_time = bool(enabled)
            if new_sigma is not None:
                module.sigma = new_sigma
            changed += 1
    return changed
