"""Data loaders with the paper's augmentation (random crop + horizontal flip), sharded for DDP."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .datasets import build_dataset, dataset_info

__all__ = ["build_loader", "default_transform", "EpochSampler"]


class EpochSampler(DistributedSampler):
    """timm/torch's ``DistributedSampler`` (order set by seed and epoch, one shard per rank) that
    can start part-way through an epoch: ``skip_batches(n)`` drops the first n batches of the
    current epoch's order (until the next ``set_epoch``), so a run resumed mid-epoch sees exactly
    the batches it had not seen."""

    def __init__(self, *args, batch_size: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size, self.skip = batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skip = 0

    def skip_batches(self, n: int) -> None:
        self.skip = n

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip * self.batch_size :])

    def __len__(self) -> int:
        return super().__len__() - self.skip * self.batch_size


def default_transform(name: str, train: bool) -> Optional[Callable]:
    """Random crop (+ 4 px padding at 32 px) and horizontal flip for training; none (CIFAR) or a
    resize + centre crop (ImageFolder datasets, timm's eval transform) for testing. No normalisation:
    images stay in [0, 1]."""
    from torchvision.transforms import v2

    info = dataset_info(name)
    if info.image_size <= 32:
        return v2.Compose([v2.RandomCrop(info.image_size, padding=4), v2.RandomHorizontalFlip()]) if train else None
    from timm.data import create_transform

    return create_transform(info.image_size, is_training=train, normalize=False, color_jitter=0.0, hflip=0.5)


def build_loader(
    name: str,
    train: bool,
    batch_size: int,
    data_dir: Optional[str] = None,
    num_samples: Optional[int] = None,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    download: bool = True,
    augment: bool = True,
    drop_last: Optional[bool] = None,
    dataset: Optional[Dataset] = None,
) -> DataLoader:
    """A loader over ``name``'s train or test split. The order is a function of ``seed`` and the
    epoch (``loader.sampler.set_epoch(epoch)``), so runs are reproducible and resumable; with
    ``world_size > 1`` each rank reads its own shard. ``dataset`` overrides the one ``name`` builds
    (e.g. a held-out subset).

    Example:
        >>> loader = build_loader(
        ...     "cifar10", train=False, batch_size=8, data_dir="../shared/data", num_samples=16, download=False
        ... )  # doctest: +SKIP
    """
    if dataset is None:
        transform = default_transform(name, train and augment)
        dataset = build_dataset(name, train, data_dir, transform, download=download, num_samples=num_samples, seed=seed)
    sampler = EpochSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=False, batch_size=batch_size
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=train if drop_last is None else drop_last,
        persistent_workers=num_workers > 0,
    )
