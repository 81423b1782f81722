"""A loader over images held as one uint8 tensor, augmented a whole batch at a time.

For small-image datasets (CIFAR) per-image transforms in worker processes cost more than a small
model's training step. :class:`TensorLoader` keeps the decoded uint8 images in one tensor (on the
GPU when training there: the airbench approach), and makes each batch with a few tensor ops:
gather, random crop from a zero-padded copy, horizontal flip, scale to [0, 1].

The epoch's order and every crop offset and flip are drawn at ``set_epoch`` from a generator seeded
by ``(seed, epoch)``, so a batch depends only on the seed, the epoch and its position: a run
resumed mid-epoch (``skip_batches``) sees exactly the batches it had not seen, whatever the global
RNG state. It mirrors the parts of ``DataLoader`` the trainer uses (``len``, iteration,
``.dataset``, ``.sampler.set_epoch`` / ``.sampler.skip_batches``).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch

__all__ = ["TensorLoader", "random_crop_flip", "tensor_arrays"]


def random_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each of ``images`` (N, C, H, W) at ``offsets`` (N, 2: row, col, in [0, 2*padding]) from a
    copy zero-padded by ``padding`` pixels, then mirror the rows where ``flips`` (N,) is true.

    Example:
        >>> x = torch.arange(16.).view(1, 1, 4, 4)
        >>> random_crop_flip(x, torch.tensor([[1, 1]]), torch.tensor([True]), padding=1)[0, 0, 0].tolist()
        [3.0, 2.0, 1.0, 0.0]
    """
    n, _, h, w = images.shape
    if padding > 0:
        images = torch.nn.functional.pad(images, (padding,) * 4)
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # (N, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class _EpochOrder:
    """The sampler part: which epoch, how many batches to skip; draws the epoch's order and augmentation."""

    def __init__(self) -> None:
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skip = epoch, 0

    def skip_batches(self, n: int) -> None:
        self.skip = n


class TensorLoader:
    """Batches of ``(float images in [0, 1], int64 labels)`` from uint8 ``images`` (N, H, W, C), as the
    datasets hold them (:func:`tensor_arrays`).

    ``train=True`` shuffles, crops (``padding`` pixels) and flips, and drops the last partial batch;
    ``train=False`` keeps the order and the images as they are. ``device`` is where the images live
    and batches are made; ``rank`` / ``world_size`` give each process its own shard (equal sizes,
    as ``DistributedSampler`` with ``drop_last``).

    Example:
        >>> images = torch.randint(0, 256, (10, 8, 8, 3), dtype=torch.uint8)
        >>> loader = TensorLoader(images, torch.arange(10), batch_size=4, train=True, seed=0)
        >>> [tuple(x.shape) for x, _ in loader]
        [(4, 3, 8, 8), (4, 3, 8, 8)]
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Sequence[int],
        batch_size: int,
        train: bool,
        seed: int = 0,
        padding: int = 4,
        flip: bool = True,
        device: Optional[torch.device] = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"TensorLoader takes uint8 images of shape (N, H, W, C), got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images.permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.padding, self.flip = (padding, flip) if train else (0, False)
        self.rank, self.world_size = rank, world_size
        self.sampler = _EpochOrder()
        self.dataset = self.images  # len(loader.dataset) is the number of images, as for a DataLoader

    def _shard_size(self) -> int:
        return len(self.images) // self.world_size if self.world_size > 1 else len(self.images)

    def __len__(self) -> int:
        size = self._shard_size()
        full = size // self.batch_size if self.train else -(-size // self.batch_size)
        return max(full - self.sampler.skip, 0)

    def _epoch_plan(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's image order, crop offsets and flips for the epoch."""
        n = len(self.images)
        if not self.train:
            index = torch.arange(n)
            return index[self.rank :: self.world_size][: self._shard_size()], torch.zeros(0), torch.zeros(0)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.sampler.epoch)
        order = torch.randperm(n, generator=gen)
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        order = order[: self._shard_size() * self.world_size][self.rank :: self.world_size]
        return order, offsets[order], flips[order]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips = self._epoch_plan()
        device = self.images.device
        order = order.to(device)
        offsets, flips = offsets.to(device), flips.to(device)
        start = self.sampler.skip
        for b in range(start, start + len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            x = self.images[order[sl]]
            if self.train:
                x = random_crop_flip(x, offsets[sl], flips[sl], self.padding)
            yield x.float().div_(255), self.labels[order[sl]]


def tensor_arrays(dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images (N, H, W, C) and labels of an in-memory dataset (``ArrayImageDataset`` or a
    ``Subset`` of one), for :class:`TensorLoader`; ``TypeError`` for datasets read file by file."""
    from torch.utils.data import Subset

    from .datasets import ArrayImageDataset

    index = None
    while isinstance(dataset, Subset):
        index = torch.as_tensor(dataset.indices) if index is None else torch.as_tensor(dataset.indices)[index]
        dataset = dataset.dataset
    if not isinstance(dataset, ArrayImageDataset):
        raise TypeError(
            f"{type(dataset).__name__} reads images file by file; the tensor loader needs an in-memory dataset (CIFAR)"
        )
    images, labels = torch.from_numpy(dataset.images), torch.as_tensor(dataset.targets, dtype=torch.int64)
    return (images, labels) if index is None else (images[index], labels[index])
