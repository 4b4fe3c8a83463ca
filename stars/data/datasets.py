"""Real-image datasets: CIFAR-10/100 (torchvision) and ImageFolder trees (Tiny-ImageNet, custom).

stars never needs real images to distill; these serve teacher training and evaluation.
A missing dataset is a :class:`DataError` naming the path and the ways out, never a
torchvision traceback. Images that cannot be decoded are skipped with a warning and counted.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from stars.config import CifarData, DataConfig, ImageFolderData
from stars.data.protocols import DataSource
from stars.errors import StarsError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "AnnotatedImages",
    "DataError",
    "DataSource",
    "ImageSource",
    "SkippingImageFolder",
    "build_data",
    "eval_transform",
    "is_annotated_split",
    "read_image_folder",
    "train_transform",
]

log = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

Stats = tuple[float, float, float]


class DataError(StarsError):
    """A dataset is missing or malformed."""


def train_transform(image_size: int, mean: Stats, std: Stats) -> v2.Compose:
    """Resize to ``image_size`` as :func:`eval_transform` does (a no-op when the stored size
    already fits), random crop with padding (size/8), horizontal flip, then normalization."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.RandomCrop(image_size, padding=image_size // 8),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def eval_transform(image_size: int, mean: Stats, std: Stats) -> v2.Compose:
    """Resize only when the stored size differs, then normalization."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class _SkipsUndecodable:
    """Shared item loading of the image-list datasets: an item whose file cannot be decoded
    is replaced by the next decodable one, with a warning, and counted (each file once).

    The record of bad files is a tensor in shared memory, so the count includes what
    DataLoader worker processes (``data.num_workers > 0``) found, not only the main process.
    """

    root: str
    samples: list[tuple[str, int]]
    transform: Callable[[Any], Any] | None

    def _init_skips(self) -> None:
        bad = torch.zeros(len(self.samples), dtype=torch.bool)
        self._bad = bad.share_memory_()  # type: ignore[no-untyped-call]

    @property
    def num_skipped(self) -> int:
        """Files found undecodable so far, in this process and its DataLoader workers."""
        return int(self._bad.sum())

    @property
    def bad_files(self) -> set[str]:
        """The paths of the files counted by :attr:`num_skipped`."""
        return {self.samples[i][0] for i in self._bad.nonzero().flatten().tolist()}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for offset in range(n):
            at = (index + offset) % n
            path, target = self.samples[at]
            try:
                with Image.open(path) as img:
                    sample = img.convert("RGB")
            except (UnidentifiedImageError, OSError) as exc:
                if not bool(self._bad[at]):
                    self._bad[at] = True
                    warnings.warn(f"skipping undecodable image {path}: {exc}", stacklevel=2)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            return sample, int(target)
        raise DataError(f"no decodable image in {self.root}")


class SkippingImageFolder(_SkipsUndecodable, datasets.ImageFolder):  # type: ignore[misc]
    """ImageFolder that skips undecodable images (warns and counts) instead of failing.

    Items whose file cannot be decoded are replaced by the next decodable item, and
    ``num_skipped`` counts them (each file once, across DataLoader workers).
    """

    def __init__(self, root: str, transform: Callable[[Any], Any] | None = None) -> None:
        super().__init__(root, transform=transform)
        self._init_skips()


ANNOTATIONS = "val_annotations.txt"
"""Tiny-ImageNet's label file for ``val/`` as shipped: ``<file>\t<wnid>\t<box...>`` lines,
the images themselves in ``val/images/``."""


class AnnotatedImages(_SkipsUndecodable, Dataset[tuple[Any, int]]):
    """Tiny-ImageNet's ``val/`` as shipped: ``images/*`` labelled by ``val_annotations.txt``.

    Labels follow ``class_to_idx`` (the training folder's, so that both splits agree).
    Undecodable images are skipped and counted as in :class:`SkippingImageFolder`.
    """

    def __init__(
        self,
        split_dir: Path,
        class_to_idx: dict[str, int],
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.root = str(split_dir)
        self.transform = transform
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
        ann = split_dir / ANNOTATIONS
        samples: list[tuple[str, int]] = []
        missing: list[str] = []
        for lineno, line in enumerate(ann.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise DataError(
                    f"{ann}:{lineno}: expected '<file><TAB><class>[<TAB>box...]', got {line!r}"
                )
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in class_to_idx:
                raise DataError(
                    f"{ann}:{lineno}: class {wnid!r} has no folder in the training split"
                )
            path = split_dir / "images" / name
            if not path.is_file():
                missing.append(name)
                continue
            samples.append((str(path), class_to_idx[wnid]))
        if missing:
            raise DataError(
                f"{ann} lists {len(missing)} image(s) missing from {split_dir / 'images'}: "
                + ", ".join(missing[:5])
                + (" ..." if len(missing) > 5 else "")
            )
        if not samples:
            raise DataError(f"{ann} lists no images")
        self.samples = samples
        self.targets = [t for _, t in samples]
        self._init_skips()


def is_annotated_split(path: Path) -> bool:
    """Whether ``path`` is a Tiny-ImageNet-style split: ``images/`` plus ``val_annotations.txt``."""
    return (path / ANNOTATIONS).is_file() and (path / "images").is_dir()


@dataclass(frozen=True)
class ImageSource:
    """A labelled image source with its normalization: the
    :class:`~stars.data.protocols.DataSource` that :func:`build_data` builds."""

    name: str
    num_classes: int
    image_size: int
    mean: Stats
    std: Stats
    _train: Callable[[bool], Dataset[Any]]
    _test: Callable[[], Dataset[Any]] | None

    def train(self, augment: bool = True) -> Dataset[Any]:
        """The training split; ``augment`` adds random crop and flip."""
        return self._train(augment)

    def test(self) -> Dataset[Any] | None:
        """The test split, or None when the source has none."""
        return self._test() if self._test is not None else None


def _missing(cfg_root: Path, what: str, download_hint: bool) -> DataError:
    ways = [f"point data.root at a folder holding {what} (--set data.root=PATH)"]
    if download_hint:
        ways.append("or allow torchvision to download it (--set data.download=true)")
    return DataError(f"dataset not found at {cfg_root}: " + "; ".join(ways))


def read_image_folder(
    path: Path, transform: Callable[[Any], Any], num_classes: int, *, expected_by: str
) -> SkippingImageFolder:
    """The ImageFolder tree at ``path`` (one folder per class), which must hold
    ``num_classes`` class folders.

    Args:
        path: the folder of class folders.
        transform: applied to each image.
        num_classes: the class count the reader expects.
        expected_by: who expects it, for the error (``"the config"``, ``"the model"``).

    Raises:
        DataError: the tree cannot be read, or holds another number of class folders.
    """
    try:
        ds = SkippingImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read image folder {path}: {exc}") from None
    if len(ds.classes) != num_classes:
        raise DataError(
            f"{path} has {len(ds.classes)} class folders, {expected_by} has {num_classes} classes"
        )
    return ds


def _image_folder(
    root: Path, split: str, transform: Callable[[Any], Any], num_classes: int
) -> SkippingImageFolder:
    path = root / split
    if not path.is_dir():
        raise DataError(f"split folder missing: {path}")
    return read_image_folder(path, transform, num_classes, expected_by="the config")


def _annotated(
    root: Path, train_dir: str, split: str, transform: Callable[[Any], Any]
) -> AnnotatedImages:
    """``root/split`` as shipped by Tiny-ImageNet, labelled with the training folder's classes."""
    _, class_to_idx = datasets.folder.find_classes(str(root / train_dir))
    return AnnotatedImages(root / split, class_to_idx, transform=transform)


def _check_same_classes(train_root: Path, test_root: Path) -> None:
    train_classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in test_root.iterdir() if p.is_dir())
    missing = sorted(set(train_classes) - set(test_classes))
    extra = sorted(set(test_classes) - set(train_classes))
    if missing or extra:
        raise DataError(
            f"class folders differ between {train_root} and {test_root}: "
            f"missing from test {missing}, only in test {extra}"
        )


def _cifar(cfg: CifarData) -> ImageSource:
    is10 = cfg.kind == "cifar10"
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if is10 else (CIFAR100_MEAN, CIFAR100_STD)
    pickled = cfg.root / ("cifar-10-batches-py" if is10 else "cifar-100-python")
    folder = (cfg.root / "train").is_dir() and (cfg.root / "test").is_dir()
    fmt = cfg.format
    if fmt == "auto":
        fmt = "imagefolder" if folder else "torchvision"
    k = cfg.num_classes
    if fmt == "imagefolder":
        if not folder:
            raise _missing(cfg.root, "train/ and test/ class folders", download_hint=False)
        _check_same_classes(cfg.root / "train", cfg.root / "test")
        return ImageSource(
            cfg.kind,
            k,
            32,
            mean,
            std,
            lambda aug: _image_folder(
                cfg.root,
                "train",
                train_transform(32, mean, std) if aug else eval_transform(32, mean, std),
                k,
            ),
            lambda: _image_folder(cfg.root, "test", eval_transform(32, mean, std), k),
        )
    if not pickled.is_dir() and not cfg.download:
        raise _missing(
            cfg.root,
            f"torchvision's {pickled.name}/ or an ImageFolder tree with train/ and test/",
            download_hint=True,
        )
    tv_cls = datasets.CIFAR10 if is10 else datasets.CIFAR100

    def make(train: bool, transform: Callable[[Any], Any]) -> Dataset[Any]:
        try:
            ds: Dataset[Any] = tv_cls(
                str(cfg.root), train=train, transform=transform, download=cfg.download
            )
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise DataError(f"cannot load {cfg.kind} from {cfg.root}: {exc}") from None
        return ds

    return ImageSource(
        cfg.kind,
        k,
        32,
        mean,
        std,
        lambda aug: make(
            True, train_transform(32, mean, std) if aug else eval_transform(32, mean, std)
        ),
        lambda: make(False, eval_transform(32, mean, std)),
    )


def _folder(cfg: ImageFolderData) -> ImageSource:
    if not (cfg.root / cfg.train_dir).is_dir():
        raise _missing(cfg.root, f"a {cfg.train_dir}/ folder of class folders", False)
    size, mean, std = cfg.image_size, cfg.mean, cfg.std
    test_fn: Callable[[], Dataset[Any]] | None = None
    if cfg.test_dir is not None:
        test_dir = cfg.test_dir
        if not (cfg.root / test_dir).is_dir():
            raise DataError(
                f"test split folder missing: {cfg.root / test_dir} "
                "(set data.test_dir to the right folder, or null for none)"
            )
        if is_annotated_split(cfg.root / test_dir):

            def test_fn() -> Dataset[Any]:
                return _annotated(
                    cfg.root, cfg.train_dir, test_dir, eval_transform(size, mean, std)
                )

        else:
            _check_same_classes(cfg.root / cfg.train_dir, cfg.root / test_dir)

            def test_fn() -> Dataset[Any]:
                return _image_folder(cfg.root, test_dir, eval_transform(size, mean, std), k)

    k = cfg.num_classes
    return ImageSource(
        "imagefolder",
        k,
        size,
        mean,
        std,
        lambda aug: _image_folder(
            cfg.root,
            cfg.train_dir,
            train_transform(size, mean, std) if aug else eval_transform(size, mean, std),
            k,
        ),
        test_fn,
    )


def build_data(cfg: DataConfig) -> DataSource:
    """The data source a config describes; raises :class:`DataError` when it is missing."""
    match cfg:
        case CifarData():
            return _cifar(cfg)
        case ImageFolderData():
            return _folder(cfg)
        case _:
            assert_never(cfg)


def first_n(ds: Dataset[Any], n: int | None) -> Dataset[Any]:
    """The first ``n`` items of ``ds`` (all when ``n`` is None or larger than the set)."""
    size = len(ds)  # type: ignore[arg-type]
    if n is None or n >= size:
        return ds
    return Subset(ds, range(n))


def stratified_subset(ds: Dataset[Any], n: int | None, seed: int = 0) -> Dataset[Any]:
    """A random subset of ``n`` items (fixed by ``seed``); all items when ``n`` is None."""
    size = len(ds)  # type: ignore[arg-type]
    if n is None or n >= size:
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(size, generator=g)[:n].sort().values.tolist()
    return Subset(ds, idx)
