"""Files written whole or not at all: every file kapify writes (checkpoints, results, caches) goes to a
temporary name in the same folder and is renamed over the old one, so a crash or a full disk never leaves
a torn file, and the previous version survives a failed write. :func:`cache_dir` is where kapify keeps what it
can rebuild (decoded datasets, the compiled noise kernel)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

__all__ = ["CACHE_DIR_ENV", "PathLike", "cache_dir", "write_atomically", "write_text_atomically"]

PathLike = Union[str, "os.PathLike[str]"]
CACHE_DIR_ENV = "KAPIFY_CACHE_DIR"


def cache_dir() -> Path:
    """``$KAPIFY_CACHE_DIR`` if set, else ``~/.cache/kapify``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "kapify").expanduser()


def write_atomically(path: PathLike, write: Callable[[str], None], what: str = "file", hint: str = "") -> None:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, then rename it to ``path``. If anything
    fails, the temporary file is removed, ``path`` is left as it was, and an ``OSError`` names ``what`` (and
    ends with ``hint``, the way out).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> write_atomically(target, lambda tmp: pathlib.Path(tmp).write_text("hi"))
        >>> target.read_text()
        'hi'
    """
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save and safetensors report a failed write as either
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(f"cannot write the {what} {path} ({err}); the previous one, if any, is unchanged{hint}") from err


def write_text_atomically(path: PathLike, text: str, what: str = "file") -> None:
    """:func:`write_atomically` for a text file."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text), what)
