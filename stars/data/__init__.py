"""stars.data: real-image sources (CIFAR-10/100, ImageFolder / Tiny-ImageNet), transforms
and class names."""

from stars.data.classes import class_names
from stars.data.datasets import DataError, DataSource, build_data, eval_transform, train_transform

__all__ = [
    "DataError",
    "DataSource",
    "build_data",
    "class_names",
    "eval_transform",
    "train_transform",
]
