"""Class names of the configured dataset, and folder names that keep the class order.

The names come without touching the disk for CIFAR-10/100 (their label order is fixed);
an ImageFolder source takes them from its training folder when that folder is there, as
torchvision does (sorted folder names), and falls back to the class indices otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stars.config import CifarData, DataConfig

__all__ = ["CIFAR10_CLASSES", "CIFAR100_CLASSES", "class_folders", "class_names"]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10's labels 0-9 in order."""

CIFAR100_CLASSES: tuple[str, ...] = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)
"""CIFAR-100's fine labels 0-99 in order (alphabetical, as the dataset numbers them)."""


def _index_names(k: int) -> tuple[str, ...]:
    width = len(str(k - 1))
    return tuple(f"{i:0{width}d}" for i in range(k))


def class_names(data: DataConfig) -> tuple[str, ...]:
    """The ``num_classes`` class names of ``data``, in label order.

    CIFAR: the datasets' own names. ImageFolder: the class folders of ``root/train_dir``
    (sorted, torchvision's label order) when there are exactly ``num_classes`` of them;
    otherwise zero-padded indices (``"000"`` ... ``"199"``).
    """
    if isinstance(data, CifarData):
        return CIFAR10_CLASSES if data.kind == "cifar10" else CIFAR100_CLASSES
    train = data.root / data.train_dir
    if train.is_dir():
        found = sorted(p.name for p in train.iterdir() if p.is_dir())
        if len(found) == data.num_classes:
            return tuple(found)
    return _index_names(data.num_classes)


_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def class_folders(names: Sequence[str]) -> tuple[str, ...]:
    """Folder names for classes ``0..K-1`` that torchvision's ``ImageFolder`` maps back to
    the same labels (it numbers folders in sorted order).

    The names themselves when they are already sorted, distinct and safe as file names;
    otherwise each is prefixed with its zero-padded index (``"07_horse"``), which sorts in
    label order whatever the names are.
    """
    safe = [_UNSAFE.sub("_", n).strip(" .") or "_" for n in names]
    if safe == sorted(safe) and len(set(safe)) == len(safe):
        return tuple(safe)
    width = len(str(len(names) - 1))
    return tuple(f"{i:0{width}d}_{n}" for i, n in enumerate(safe))
