"""Block handlers: rewrite the channel sizes a block stores for its own splits and slices.

A block that cuts its channels at sizes it keeps in attributes (CSPNet's ``x.split(self.expand_chs
// 2, dim=1)``, GhostNet's ``out[:, :self.out_chs]``) breaks when its channels are re-widened,
unless those attributes are rewritten. The analysis follows such a split only inside a block with a
registered handler; after re-widening, the handler gets a :class:`StoredSizes` that maps each old
channel offset of the block's splits to the new one, and rewrites its attributes:

    >>> from torch import nn
    >>> class Halves(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.half = nn.Conv2d(3, 8, 1), 4
    ...     def forward(self, x):
    ...         a, b = self.conv(x).split(self.half, dim=1)
    ...         return a * b
    >>> @register_block_handler(Halves)
    ... def halves(block, sizes):
    ...     '''x.split(self.half, 1)'''
    ...     block.half = sizes(block.half)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Type

from torch import fx, nn

from ..registry import Registry

__all__ = ["BlockHandler", "StoredSizes", "register_block_handler", "block_handler", "block_owner", "counts_heads"]


class StoredSizes:
    """The new value of each old channel offset at which a block splits or slices its channels."""

    def __init__(self, block: str, offsets: Dict[int, Set[int]]) -> None:
        self.block, self.offsets = block, offsets

    def __call__(self, old: int) -> int:
        """The new offset of old channel offset ``old`` (a split size, a slice end)."""
        if old == 0:
            return 0
        new = self.offsets.get(old)
        if new is None:
            raise KeyError(
                f"block '{self.block}' has no split or slice at {old} channels (it has {sorted(self.offsets)})"
            )
        if len(new) > 1:
            raise ValueError(f"block '{self.block}' cuts at {old} channels in places that now differ ({sorted(new)})")
        return next(iter(new))

    def get(self, old: int) -> int:
        """The new value of ``old`` if the block cuts or reshapes at it, else ``old`` (an attribute the
        traced forward did not read, e.g. ``attn_dim`` when the block reshapes to ``x.shape[-1]``)."""
        return self(old) if old in self.offsets else old

    def pieces(self, old_sizes: Sequence[int]) -> List[int]:
        """New piece sizes of a split by the list ``old_sizes`` (``torch.split(x, self.splits, 1)``)."""
        ends = [self(end) for end in itertools.accumulate(old_sizes)]
        return [b - a for a, b in zip([0] + ends[:-1], ends)]


BlockHandler = Callable[[nn.Module, StoredSizes], None]


@dataclass(frozen=True)
class BlockRule:
    """A block's handler; ``heads``: it rewrites the block's stored head count."""

    handler: BlockHandler
    heads: bool = False


#: blocks that store the sizes of their channel splits -> their handler (subclasses included)
BLOCK_HANDLERS: Registry[BlockRule] = Registry("block handler")


def register_block_handler(
    *block_types: Type[nn.Module], heads: bool = False, reason: str = ""
) -> Callable[[BlockHandler], BlockHandler]:
    """Register ``handler(block, sizes)`` for blocks that store the sizes of their channel splits.
    ``heads=True``: an attention block whose handler rewrites its stored head count; its channels
    widen by whole heads even where it computes the head dim (``reshape(B, N, self.num_heads, -1)``)."""
    bad = [t for t in block_types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad or not block_types:
        raise TypeError(
            f"register_block_handler takes nn.Module classes, got {bad or 'none'}; e.g. "
            f"@register_block_handler(MyBlock)"
        )

    def register(handler: BlockHandler) -> BlockHandler:
        for block_type in block_types:
            BLOCK_HANDLERS.add(block_type, BlockRule(handler, heads), reason)
        return handler

    return register


def counts_heads(node: fx.Node, root: type) -> bool:
    """Whether ``node`` is in an attention block registered with ``heads=True``."""
    _, block_type = block_owner(node, root)
    return any(getattr(BLOCK_HANDLERS.get(cls), "heads", False) for cls in getattr(block_type, "__mro__", ()))


def block_handler(block_type: Type[nn.Module]) -> Optional[BlockHandler]:
    """The handler of a block type's most specific registered class, or None."""
    rule = BLOCK_HANDLERS.for_class(block_type)
    return None if rule is None else rule.handler


def block_owner(node: fx.Node, root: type) -> Tuple[Optional[str], type]:
    """(path, type) of the innermost block around ``node`` with a handler (the model itself is ``""``,
    of type ``root``); else (None, the innermost block's type)."""
    stack = [("", root)] + list(node.meta.get("nn_module_stack", {}).values())  # (path, type), outermost first
    for path, block_type in reversed(stack):
        if isinstance(block_type, type) and block_handler(block_type) is not None:
            return path, block_type
    return None, stack[-1][1]
