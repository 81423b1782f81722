"""Gaussian noise on a CPU at the speed of a memory pass: ``x + sigma * z`` in one vectorised,
multi-threaded C loop (``normal_kernel.c``), instead of torch's ``normal_`` (one thread) followed by an add: 0.7 ns
per element against 4.0 (float32) and 5.1 (bf16) on a 2-core Xeon (``benchmarks/cpu_noise_and_pool_ops.py``). The
loop runs on torch's own OpenMP threads (the library links the libgomp torch loaded), so it does not compete with
them.

The numbers are exact i.i.d. N(0, sigma^2) draws of a counter-based generator (Philox4x32-10, the
generator of cuRAND, and Box-Muller): element ``e`` of a call gets the normal numbered ``e`` under
a 64-bit key drawn from torch's default CPU generator. So the noise is reproducible from
``torch.manual_seed`` (and from a checkpoint's RNG state), and independent of how the elements are
split across threads. The kernel is compiled once per machine with the system C compiler into
kapify's cache folder (``$KAPIFY_CACHE_DIR``, default ``~/.cache/kapify``, as the dataset cache); without a compiler,
or with ``KAPIFY_FAST_NOISE=0``, :func:`add_gaussian` returns None and the caller uses torch's generator.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from ..files import cache_dir

__all__ = ["add_gaussian", "fast_noise_available", "kernel_normals", "torch_generator"]

_SOURCE = Path(__file__).with_name("normal_kernel.c")


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags: a kernel built with -march=native runs only on such a CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))


def _compile_flags(openmp: bool) -> List[str]:
    flags = ["-O3", "-march=native", "-ffast-math", "-shared", "-fPIC"] + (["-fopenmp"] if openmp else [])
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=512")  # AVX-512 where the CPU has it (gcc prefers 256-bit vectors)
    return flags


def _build(compiler: str) -> Path:
    """Compile ``normal_kernel.c`` into the cache (once per source, compiler, flags and CPU); return the
    library. With OpenMP if the compiler has it, else single-threaded."""
    errors, source, cpu = [], _SOURCE.read_text(), _cpu_identity()
    for flags in (_compile_flags(openmp=True), _compile_flags(openmp=False)):
        key = hashlib.sha256("\0".join([source, compiler, *flags, cpu]).encode()).hexdigest()[:16]
        target = cache_dir() / f"normal_kernel-{key}.so"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # same file system: the rename below is atomic
            built = Path(tmp) / target.name
            done = subprocess.run(
                [compiler, *flags, "-o", str(built), str(_SOURCE), "-lm"], capture_output=True, text=True
            )
            if done.returncode == 0:
                os.replace(built, target)  # concurrent builders (DDP ranks) each write a whole file
                return target
            errors.append(done.stderr.strip()[-300:])
    raise RuntimeError(f"{compiler} failed: {' / '.join(errors)}")


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get("KAPIFY_FAST_NOISE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC)")
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as err:
        warnings.warn(
            f"kapify: CPU noise falls back to torch's single-threaded generator (slower): could not build "
            f"kapify/layers/normal_kernel.c: {err}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    for fn in (lib.kap_add_normal_f32, lib.kap_add_normal_bf16):
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_float,
            ctypes.c_uint64,
            ctypes.c_int,
        ]
        fn.restype = None
    return lib


def fast_noise_available() -> bool:
    """Whether the compiled CPU noise kernel is in use (builds it on the first call)."""
    return _library() is not None


def _run(
    kernel: Callable,
    x: Optional[torch.Tensor],
    out: torch.Tensor,
    start: int,
    end: int,
    sigma: float,
    seed: int,
    threads: int,
) -> None:
    """Elements [start, end) of ``out`` (flat storage) = ``x`` + sigma * z, on ``threads`` OpenMP threads."""
    kernel(None if x is None else x.data_ptr(), out.data_ptr(), start, end, sigma, seed, threads)


def _kernel_for(dtype: torch.dtype) -> Optional[Callable]:
    lib = _library()
    if lib is None:
        return None
    return {torch.float32: lib.kap_add_normal_f32, torch.bfloat16: lib.kap_add_normal_bf16}.get(dtype)


class _AddGaussian(torch.autograd.Function):
    """``x + sigma * z``, into a new tensor or into ``x`` itself; the gradient passes through unchanged."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        kernel: Callable,
        sigma: float,
        seed: int,
        threads: int,  # type: ignore[override]
        inplace: bool,
    ) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x
        else:
            out = torch.empty_like(x)  # same layout as x when x is dense (channels_last stays channels_last)
            if out.stride() != x.stride():  # a strided view: copy it into the dense layout, then add in place
                x = out.copy_(x)
        _run(kernel, x, out, 0, out.numel(), sigma, seed, threads)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        return grad, None, None, None, None, None


def _reusable(x: torch.Tensor) -> bool:
    """Whether ``x``'s memory may take the result: a dense tensor that is no view, whose producer's
    backward does not read it (autograd would refuse the gradient otherwise)."""
    if x._base is not None or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return False
    if x.requires_grad:
        return x.grad_fn is not None and not hasattr(x.grad_fn, "_saved_result")
    return True


_use_torch = threading.local()


@contextlib.contextmanager
def torch_generator() -> Iterator[None]:
    """Within this block (on this thread), noise is drawn with torch's generator, as without the kernel
    (``benchmarks/overhead.py`` compares the two side by side).

    Example:
        >>> with torch_generator():
        ...     add_gaussian(torch.zeros(3), 0.1) is None
        True
    """
    before = getattr(_use_torch, "on", False)
    _use_torch.on = True
    try:
        yield
    finally:
        _use_torch.on = before


def _seed() -> int:
    """A 63-bit key from torch's default CPU generator (so ``torch.manual_seed`` fixes the noise)."""
    return int(torch.empty((), dtype=torch.int64).random_())


@torch.jit.unused
def add_gaussian(
    x: torch.Tensor, sigma: float, threads: Optional[int] = None, reuse_input: bool = False
) -> Optional[torch.Tensor]:
    """``x + N(0, sigma^2)`` noise through the compiled kernel, or None where it does not apply (not a
    CPU float32/bfloat16 tensor, inside ``torch.compile``, or no kernel): then draw the noise with torch.

    ``reuse_input=True`` says that nothing else holds ``x`` (a layer's fresh output): the sum is then
    written into ``x`` where autograd allows it, which saves allocating a new tensor (a third of the
    cost for a large one).

    Example:
        >>> x = torch.zeros(4, 8, 16, 16)
        >>> y = add_gaussian(x, 0.1)
        >>> y is None or (y.shape == x.shape and 0.05 < float(y.std()) < 0.15)
        True
    """
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if getattr(_use_torch, "on", False):
        return None
    kernel = _kernel_for(x.dtype)
    if kernel is None or x.numel() == 0:
        return None
    inplace = reuse_input and _reusable(x)
    return _AddGaussian.apply(x, kernel, float(sigma), _seed(), threads or torch.get_num_threads(), inplace)


def kernel_normals(
    numel: int, seed: int, dtype: torch.dtype = torch.float32, start: int = 0, threads: int = 1
) -> torch.Tensor:
    """The kernel's standard normals numbered ``start .. start + numel - 1`` under ``seed``: the numbers that
    :func:`add_gaussian` adds, times sigma (for tests and checks). Raises if the kernel is not available.

    Example:
        >>> z = kernel_normals(1000, seed=0) if fast_noise_available() else torch.randn(1000)
        >>> abs(float(z.mean())) < 0.2
        True
    """
    kernel = _kernel_for(dtype)
    if kernel is None:
        raise RuntimeError("the compiled noise kernel is not available (see kapify's warning, or KAPIFY_FAST_NOISE)")
    out = torch.empty(start + numel, dtype=dtype)
    _run(kernel, None, out, start, start + numel, 1.0, seed, threads)
    return out[start:]
