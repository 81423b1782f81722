"""Datasets by name, found under ``--data-dir`` / ``$KAPIFY_DATA_DIR``; images come out as float
tensors in [0, 1] (models normalise inside themselves, so noise and attacks live in pixel space).

Where each dataset is looked for (``root`` = the data dir):

- ``cifar10``: ``root/cifar-10-batches-py`` (torchvision), else the JPEG copy
  ``root/[cifar10-jpeg/]{train,test}.tar.gz`` (read straight from the archive) or its extracted
  ``{train,test}/<class>/*.jpg``, else downloaded by torchvision.
  Decoded CIFAR images are cached as uint8 tensors (:mod:`kapify.data.cache`).
- ``cifar100``: ``root/cifar-100-python`` (torchvision), else downloaded.
- ``tinyimagenet``: ``root/tiny-imagenet-200/{train,val}`` (val read from ``val_annotations.txt``).
- ``imagenet``: ``root/imagenet/{train,val}`` or ``root/{train,val}`` in ImageFolder layout.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from .cache import cached_decode

__all__ = ["DatasetInfo", "DATASETS", "dataset_info", "resolve_data_dir", "build_dataset", "ArrayImageDataset"]

DATA_DIR_ENV = "KAPIFY_DATA_DIR"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: classes, image size, per-channel mean/std."""

    name: str
    num_classes: int
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


DATASETS: Dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, 128, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagenet": DatasetInfo("imagenet", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset name (``cifar10``, ``cifar100``, ``tinyimagenet``, ``imagenet``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; kapify knows {sorted(DATASETS)}")
    return DATASETS[name]


def resolve_data_dir(data_dir: Optional[str] = None) -> Path:
    """``data_dir`` if given, else ``$KAPIFY_DATA_DIR``, else ``./data``."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data").expanduser()


class ArrayImageDataset(Dataset):
    """Images held in memory as one uint8 ``(N, H, W, 3)`` array; items are ``(float CHW in [0,1], label)``."""

    def __init__(
        self, images: np.ndarray, targets: Sequence[int], classes: List[str], transform: Optional[Callable] = None
    ):
        self.images, self.targets, self.classes, self.transform = images, list(targets), classes, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _read_jpeg_archive(archive: Path, split: str) -> Tuple[np.ndarray, List[int], List[str]]:
    """Decode ``split/<class>/*.jpg`` members of a .tar.gz straight into memory (class folders sorted)."""
    by_class: Dict[str, List[Tuple[str, bytes]]] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if (
                member.isfile()
                and len(parts) >= 3
                and parts[-3] == split
                and parts[-1].lower().endswith((".jpg", ".jpeg", ".png"))
            ):
                by_class.setdefault(parts[-2], []).append((member.name, tar.extractfile(member).read()))
    if not by_class:
        raise ValueError(f"{archive} holds no {split}/<class>/<image> files")
    classes = sorted(by_class)
    images, targets = [], []
    for label, cls in enumerate(classes):
        for _, data in sorted(by_class[cls]):
            images.append(_decode(data))
            targets.append(label)
    return np.stack(images), targets, classes


def _read_image_folder(folder: Path) -> Tuple[np.ndarray, List[int], List[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, targets = [], []
    for label, cls in enumerate(classes):
        for path in sorted((folder / cls).iterdir()):
            images.append(_decode(path.read_bytes()))
            targets.append(label)
    return np.stack(images), targets, classes


def _torchvision_cifar(
    cls_name: str, root: Path, train: bool, download: bool
) -> Tuple[np.ndarray, List[int], List[str]]:
    import torchvision

    ds = getattr(torchvision.datasets, cls_name)(str(root), train=train, download=download)
    return ds.data, list(ds.targets), list(ds.classes)


def _cifar(name: str, root: Path, train: bool, download: bool, transform: Optional[Callable]) -> Dataset:
    folder, cls_name = {"cifar10": ("cifar-10-batches-py", "CIFAR10"), "cifar100": ("cifar-100-python", "CIFAR100")}[
        name
    ]
    split = "train" if train else "test"
    looked = [root / folder]

    def decoded(source: Path, decode: Callable[[], Tuple[np.ndarray, List[int], List[str]]]) -> ArrayImageDataset:
        return ArrayImageDataset(*cached_decode(name, split, [source], decode), transform)

    if (root / folder).is_dir():
        return decoded(root / folder, lambda: _torchvision_cifar(cls_name, root, train, False))
    if name == "cifar10":
        for base in (root / "cifar10-jpeg", root):
            looked += [base / f"{split}.tar.gz", base / split]
            if (base / f"{split}.tar.gz").is_file():
                return decoded(base / f"{split}.tar.gz", lambda: _read_jpeg_archive(base / f"{split}.tar.gz", split))
            if (base / split).is_dir():
                return decoded(base / split, lambda: _read_image_folder(base / split))
    if download:
        try:
            return ArrayImageDataset(*_torchvision_cifar(cls_name, root, train, True), transform)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            looked.append(f"download failed: {err}")
    raise FileNotFoundError(
        f"{name} not found (looked for: {', '.join(map(str, looked))}). Point --data-dir / ${DATA_DIR_ENV} at a folder "
        f"holding torchvision's '{folder}'"
        + (" or the JPEG copy (train.tar.gz, test.tar.gz)" if name == "cifar10" else "")
        + ", or run once online to download it."
    )


def _tinyimagenet(root: Path, train: bool, transform: Optional[Callable]) -> Dataset:
    from torchvision.datasets import ImageFolder

    base = root / "tiny-imagenet-200"
    if not (base / "train").is_dir():
        raise FileNotFoundError(
            f"tinyimagenet not found: no {base / 'train'}; extract tiny-imagenet-200.zip under --data-dir"
        )
    train_set = ImageFolder(str(base / "train"), transform=transform)
    if train:
        return train_set
    annotations = base / "val" / "val_annotations.txt"
    if not annotations.is_file():
        return ImageFolder(str(base / "val"), transform=transform)
    val = ImageFolder(str(base / "train"), transform=transform)  # reuse class list and loader
    rows = [line.split("\t")[:2] for line in annotations.read_text().splitlines() if line.strip()]
    val.samples = [(str(base / "val" / "images" / f), val.class_to_idx[c]) for f, c in rows]
    val.targets = [t for _, t in val.samples]
    val.imgs = val.samples
    return val


def _imagenet(root: Path, train: bool, transform: Optional[Callable]) -> Dataset:
    from torchvision.datasets import ImageFolder

    split = "train" if train else "val"
    for base in (root / "imagenet", root):
        if (base / split).is_dir():
            return ImageFolder(str(base / split), transform=transform)
    raise FileNotFoundError(
        f"imagenet not found: no {root / 'imagenet' / split} or {root / split} (ImageFolder layout)"
    )


def build_dataset(
    name: str,
    train: bool,
    data_dir: Optional[str] = None,
    transform: Optional[Callable] = None,
    download: bool = True,
    num_samples: Optional[int] = None,
    seed: int = 0,
) -> Dataset:
    """The ``train`` or test/val split of dataset ``name``; ``num_samples`` keeps a seeded random subset.

    ``transform`` receives float CHW tensors in [0, 1] for CIFAR and PIL images for ImageFolder
    datasets (use :func:`kapify.data.loader.default_transform`). Nothing is downloaded when
    ``download=False`` or when the data is already there.
    """
    info = dataset_info(name)
    root = resolve_data_dir(data_dir)
    if info.name in ("cifar10", "cifar100"):
        dataset = _cifar(info.name, root, train, download, transform)
    elif info.name == "tinyimagenet":
        dataset = _tinyimagenet(root, train, transform)
    else:
        dataset = _imagenet(root, train, transform)
    if num_samples is not None and num_samples < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples]
        dataset = Subset(dataset, index.tolist())
    return dataset
