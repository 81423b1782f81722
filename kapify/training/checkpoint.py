"""Resumable training state: one atomic ``last.pth`` per run (weights, optimizer, scheduler, EMA,
position in the data order and every RNG), so a crashed run continues where it stopped."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..files import write_atomically

__all__ = ["rng_state", "set_rng_state", "save_state", "load_state"]


def rng_state() -> Dict[str, Any]:
    """Every random state a training step draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: Dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` to a temporary name, then rename (never a torn file). A failed
    write (a full disk) leaves the previous checkpoint as it was and no temporary file behind."""
    write_atomically(
        path,
        lambda tmp: torch.save(state, tmp),
        "training checkpoint",
        hint=": free space, then rerun the same command to resume from it",
    )


def load_state(path: Path) -> Optional[Dict[str, Any]]:
    """The state saved at ``path``, or None if there is none."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated/corrupt file: say which and how to proceed
        raise RuntimeError(
            f"cannot read the training checkpoint {path} ({err}); delete it to start over, or pass --resume none"
        ) from err
