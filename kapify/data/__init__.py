"""Datasets in [0,1] pixel space: CIFAR-10/100 (torchvision layout or the JPEG archives), TinyImageNet, ImageNet."""

from .datasets import DATASETS, DatasetInfo, build_dataset, dataset_info, resolve_data_dir
from .loader import build_loader

__all__ = ["DATASETS", "DatasetInfo", "build_dataset", "build_loader", "dataset_info", "resolve_data_dir"]
