"""Dataclass-defined options shared by the recipes and ``kapify-eval``: every field becomes a
``--flag``; ``--config file.yaml`` (timm's args-file convention) sets values, flags override."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Dict, List, Optional, Type, TypeVar

import yaml

__all__ = ["option", "build_parser", "parse_options"]

T = TypeVar("T")


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its ``--help`` text (``choices=[...]`` passes to argparse)."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def _flag_type(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (dict, list) or tp in (dict, list):
        return yaml.safe_load
    return _bool if tp is bool else tp


def _bool(text: str) -> bool:
    value = str(text).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls: type, description: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """One ``--flag-name`` per field of dataclass ``cls`` (``--kap-k 3``, ``--model-kwargs '{drop_rate: 0.1}'``),
    plus ``-c/--config``. A boolean field is a flag pair, ``--download`` / ``--no-download`` (an explicit
    ``--download false`` is accepted too)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", default=None, help="YAML args file; command-line flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kwargs: Dict[str, Any] = {
            "help": f.metadata["help"],
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "type": _flag_type(hints[f.name]),
        }
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        flag = "--" + f.name.replace("_", "-")
        if kwargs["type"] is _bool:
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag, nargs="?", const=True, metavar="BOOL", **kwargs)
            group.add_argument(
                "--no-" + flag[2:],
                dest=f.name,
                action="store_false",
                default=argparse.SUPPRESS,
                help=f"the opposite of {flag}",
            )
        else:
            parser.add_argument(flag, **kwargs)
    return parser


def parse_options(cls: Type[T], argv: Optional[List[str]], description: str, prog: Optional[str] = None) -> T:
    """Defaults, then the ``--config`` YAML, then command-line flags, as an instance of ``cls``."""
    args = vars(build_parser(cls, description, prog).parse_args(argv))
    values: Dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path:
        with open(config_path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path} must hold a mapping of option: value")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(k.replace("-", "_") for k in loaded) - names)
        if unknown:
            raise ValueError(f"{config_path}: unknown option(s) {unknown}; see --help")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(args)
    return cls(**values)
