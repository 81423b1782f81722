"""The versions of kapify and the packages it runs on, as recorded in results and diagnostics."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Dict, Optional

__version__ = "0.1.0"  # the package version (pyproject.toml says the same; a test checks)

__all__ = ["versions"]

PACKAGES = ("torch", "torchvision", "timm", "pyautoattack")


def versions() -> Dict[str, Optional[str]]:
    """kapify's, Python's and each of :data:`PACKAGES`' installed version (None: not installed).

    Example:
        >>> sorted(versions())
        ['kapify', 'pyautoattack', 'python', 'timm', 'torch', 'torchvision']
    """
    found: Dict[str, Optional[str]] = {"kapify": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found
