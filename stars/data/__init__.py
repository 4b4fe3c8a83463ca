"""stars.data: real-image sources (CIFAR-10/100, ImageFolder / Tiny-ImageNet) and transforms."""

from stars.data.datasets import DataError, DataSource, build_data, eval_transform, train_transform

__all__ = ["DataError", "DataSource", "build_data", "eval_transform", "train_transform"]
