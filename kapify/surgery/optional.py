"""Rules that need a class of timm or torchvision: each is registered only if the installed version
has its class, and every class that is missing is recorded, so that an older or newer timm costs
the rules of its missing modules and no others, and says so (a warning at the first conversion,
:func:`kapify.diagnostics`).
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Tuple, TypeVar

from ..versions import versions

__all__ = ["Skipped", "diagnostics", "optional_imports", "register_present", "skipped_rules", "warn_skipped_once"]


@dataclass(frozen=True)
class Skipped:
    """A class kapify has a rule for that this environment lacks."""

    path: str  # "module:Class", e.g. "timm.models.shvit:SHSA"
    used_for: str  # what kapify loses without it
    error: str

    def to_dict(self) -> Dict[str, str]:
        return asdict(self)


_SKIPPED: List[Skipped] = []
_warned = [False]


def optional_imports(*paths: str, used_for: str) -> Tuple[Any, ...]:
    """The classes (or functions) named ``"module:Name"`` that the installed packages have; each missing one
    is recorded with ``used_for``.

    Example:
        >>> optional_imports("torch.nn:Conv2d", "torch.nn:Conv3d", used_for="an example")
        (<class 'torch.nn.modules.conv.Conv2d'>, <class 'torch.nn.modules.conv.Conv3d'>)
    """
    found = []
    for path in paths:
        module, _, name = path.partition(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as err:
            _SKIPPED.append(Skipped(path, used_for, f"{type(err).__name__}: {err}"))
    return tuple(found)


def skipped_rules() -> List[Skipped]:
    """The rules left out because their class is missing, in the order they were met."""
    return list(_SKIPPED)


def warn_skipped_once() -> None:
    """Warn, once per process, if any rule was left out (called by ``kapify.convert``)."""
    if _SKIPPED and not _warned[0]:
        _warned[0] = True
        found = versions()
        libraries = ", ".join(f"{k} {found[k]}" for k in ("torch", "torchvision", "timm"))
        missing = "; ".join(f"{s.path} ({s.used_for})" for s in _SKIPPED)
        warnings.warn(
            f"kapify: {len(_SKIPPED)} rule(s) left out because {libraries} lacks their class: {missing}. Models "
            f"built from those blocks may keep rectangular grids or fail to re-widen; kapify.diagnostics() lists them",
            RuntimeWarning,
            stacklevel=3,
        )


def diagnostics() -> Dict[str, Any]:
    """What kapify found in this environment: package versions, the rules left out for a missing class,
    and whether the compiled CPU noise kernel is in use.

    Example:
        >>> import kapify
        >>> sorted(kapify.diagnostics())
        ['fast_cpu_noise', 'skipped_rules', 'versions']
    """
    from ..layers.fast_noise import fast_noise_available

    return {
        "versions": versions(),
        "skipped_rules": [s.to_dict() for s in _SKIPPED],
        "fast_cpu_noise": fast_noise_available(),
    }


F = TypeVar("F", bound=Callable[..., Any])


def register_present(register: Callable[..., Callable[[F], F]], *paths: str, **options: Any) -> Callable[[F], F]:
    """A decorator: ``register(*classes, **options)`` for those of the classes named by ``paths``
    (``"module:Class"``) that exist; each missing one is recorded (with the decorated function's name)
    instead of costing the others. The function is returned either way.

    Example:
        >>> found = {}
        >>> def register_demo(*classes):
        ...     return lambda fn: found.update(dict.fromkeys(classes, fn)) or fn
        >>> @register_present(register_demo, "torch.nn:Identity")
        ... def identity_rule(block, sizes):
        ...     pass
        >>> list(found)
        [<class 'torch.nn.modules.linear.Identity'>]
    """

    def decorate(fn: F) -> F:
        classes = optional_imports(*paths, used_for=f"{register.__name__.removeprefix('register_')} {fn.__name__}")
        if classes:
            register(*classes, **options)(fn)
        return fn

    return decorate
