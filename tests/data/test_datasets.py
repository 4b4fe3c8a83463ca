"""Real-image data sources: generated ImageFolder trees, the offline CIFAR-10 subset, errors."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from stars.config import CifarData, ImageFolderData
from stars.data.classes import CIFAR10_CLASSES
from stars.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    AnnotatedImages,
    DataError,
    DataSource,
    SkippingImageFolder,
    build_data,
    eval_transform,
)


def _write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    """A random RGB image (``size`` = width, height) as PNG or JPEG, by suffix."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _make_tree(
    root: Path,
    classes: dict[str, list[str]],
    *,
    per_class: int = 2,
    size: tuple[int, int] = (64, 64),
) -> Path:
    """``root/<split>/<class>/img<i>.{png,jpg}`` for each split and its classes."""
    seed = 0
    for split, names in classes.items():
        for name in names:
            for i in range(per_class):
                ext = "png" if i % 2 == 0 else "jpg"
                _write_image(root / split / name / f"img{i}.{ext}", size, seed)
                seed += 1
    return root


def _item(ds: Dataset[Any], i: int) -> tuple[Tensor, int]:
    x, y = ds[i]
    assert isinstance(x, Tensor)
    assert isinstance(y, int)
    return x, y


def _len(ds: Dataset[Any]) -> int:
    n = len(ds)  # type: ignore[arg-type]
    return n


TINY = {"train": ["n01", "n02", "n03"], "val": ["n01", "n02", "n03"]}


# ----------------------------------------------------------------------------- ImageFolder


def test_tiny_imagenet_like_tree(tmp_path: Path) -> None:
    root = _make_tree(tmp_path, TINY)
    source = build_data(ImageFolderData(root=root, num_classes=3))
    assert isinstance(source, DataSource)
    assert (source.num_classes, source.image_size) == (3, 64)
    train, test = source.train(augment=False), source.test()
    assert test is not None
    assert _len(train) == 6
    assert _len(test) == 6
    labels = sorted(_item(train, i)[1] for i in range(_len(train)))
    assert labels == [0, 0, 1, 1, 2, 2]
    x, _ = _item(test, 0)
    assert x.shape == (3, 64, 64)
    assert x.dtype == torch.float32
    xa, _ = _item(source.train(augment=True), 0)
    assert xa.shape == (3, 64, 64)
    # a DataLoader batches them
    xb, yb = next(iter(DataLoader(train, batch_size=4)))
    assert xb.shape == (4, 3, 64, 64)
    assert yb.shape == (4,)


def test_eval_transform_normalizes_with_the_configured_stats(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for split in ("train", "val"):
        for name in ("a", "b"):
            d = root / split / name
            d.mkdir(parents=True)
            Image.new("RGB", (16, 16), (255, 0, 128)).save(d / "x.png")
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.25, 0.5)
    source = build_data(
        ImageFolderData(root=root, num_classes=2, image_size=16, mean=mean, std=std)
    )
    x, _ = _item(source.train(augment=False), 0)
    want = [(v - m) / s for v, m, s in zip((1.0, 0.0, 128 / 255), mean, std, strict=True)]
    torch.testing.assert_close(x.mean((1, 2)), torch.tensor(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("stored", "image_size"), [((64, 64), 32), ((64, 48), 32), ((32, 32), 64), ((40, 40), 40)]
)
@pytest.mark.parametrize("augment", [False, True])
def test_images_come_out_at_image_size(
    tmp_path: Path, stored: tuple[int, int], image_size: int, augment: bool
) -> None:
    root = _make_tree(tmp_path, TINY, per_class=1, size=stored)
    source = build_data(ImageFolderData(root=root, num_classes=3, image_size=image_size))
    assert source.image_size == image_size
    x, _ = _item(source.train(augment=augment), 0)
    assert x.shape == (3, image_size, image_size)
    test = source.test()
    assert test is not None
    assert _item(test, 0)[0].shape == (3, image_size, image_size)


def test_downsized_training_images_show_the_whole_picture(tmp_path: Path) -> None:
    """Training at 32px from 64px files resizes (as evaluation does), never crops a quarter."""
    root = tmp_path / "halves"
    for split in ("train", "val"):
        d = root / split / "only"
        d.mkdir(parents=True)
        img = Image.new("RGB", (64, 64), (0, 0, 0))
        img.paste((255, 255, 255), (32, 0, 64, 64))  # right half white
        img.save(d / "x.png")
    source = build_data(ImageFolderData(root=root, num_classes=1, image_size=32))
    torch.manual_seed(0)
    for _ in range(8):
        x, _ = _item(source.train(augment=True), 0)
        # every crop of the resized picture keeps both a dark and a bright part
        assert x.max() > 1.0
        assert x.min() < -1.0


def test_test_dir_none_has_no_test_split(tmp_path: Path) -> None:
    root = _make_tree(tmp_path, {"train": ["a", "b"]}, per_class=1)
    source = build_data(ImageFolderData(root=root, num_classes=2, test_dir=None))
    assert source.test() is None


def test_class_count_mismatch(tmp_path: Path) -> None:
    root = _make_tree(tmp_path, TINY, per_class=1)
    source = build_data(ImageFolderData(root=root, num_classes=5))
    with pytest.raises(DataError, match="3 class folders") as info:
        source.train()
    assert "5" in str(info.value)


def test_class_missing_from_the_test_split_is_named(tmp_path: Path) -> None:
    root = _make_tree(
        tmp_path, {"train": ["cat", "dog", "zebra"], "val": ["cat", "dog"]}, per_class=1
    )
    with pytest.raises(DataError, match="zebra") as info:
        build_data(ImageFolderData(root=root, num_classes=3))
    assert "cat" not in str(info.value).split("missing from test")[1].split("only in test")[0]


def test_class_folder_without_images(tmp_path: Path) -> None:
    root = _make_tree(tmp_path, TINY, per_class=1)
    (root / "train" / "n04").mkdir()
    (root / "val" / "n04").mkdir()
    (root / "train" / "n04" / "notes.txt").write_text("no images here")
    source = build_data(ImageFolderData(root=root, num_classes=4))
    with pytest.raises(DataError, match="n04") as info:
        source.train()
    assert info.value.__cause__ is None


def test_missing_test_dir_names_the_setting(tmp_path: Path) -> None:
    root = _make_tree(tmp_path, {"train": ["a", "b"]}, per_class=1)
    with pytest.raises(DataError, match=r"data\.test_dir"):
        build_data(ImageFolderData(root=root, num_classes=2))


def _corrupt_tree(tmp_path: Path) -> Path:
    root = _make_tree(tmp_path, TINY, per_class=2, size=(16, 16))
    (root / "train" / "n02" / "broken.png").write_bytes(b"definitely not a png")
    whole = tmp_path / "whole.jpg"
    _write_image(whole, (64, 64), 99)
    (root / "train" / "n03" / "cut.jpg").write_bytes(whole.read_bytes()[:300])  # truncated
    return root


def test_undecodable_images_are_skipped_with_a_warning_and_counted(tmp_path: Path) -> None:
    root = _corrupt_tree(tmp_path)
    source = build_data(ImageFolderData(root=root, num_classes=3, image_size=16))
    ds = source.train(augment=False)
    assert isinstance(ds, SkippingImageFolder)
    assert _len(ds) == 8
    with pytest.warns(UserWarning, match="undecodable") as record:
        items = [_item(ds, i) for i in range(_len(ds))]
    assert ds.num_skipped == 2
    assert {Path(p).name for p in ds.bad_files} == {"broken.png", "cut.jpg"}
    assert len(record) == 2
    assert all(x.shape == (3, 16, 16) for x, _ in items)
    # the stand-in for a bad item is the next decodable one, with its own label
    assert items[ds.samples.index(next(s for s in ds.samples if "broken" in s[0]))][1] == 1
    # a second pass counts each bad file once and warns no more
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        for i in range(_len(ds)):
            _item(ds, i)
    assert not again
    assert ds.num_skipped == 2


def test_skips_found_in_dataloader_workers_are_counted_in_the_main_process(
    tmp_path: Path,
) -> None:
    """With ``data.num_workers > 0`` each worker decodes its own share; the count the run
    reports (in the main process) includes theirs, each file once."""
    root = _corrupt_tree(tmp_path)
    ds = build_data(ImageFolderData(root=root, num_classes=3, image_size=16)).train(augment=False)
    assert isinstance(ds, SkippingImageFolder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # a second epoch counts nothing twice
            batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert sum(len(y) for _, y in batches) == 8
    assert ds.num_skipped == 2
    assert {Path(p).name for p in ds.bad_files} == {"broken.png", "cut.jpg"}


def _shipped_tiny_imagenet(root: Path, val: list[tuple[str, str]]) -> Path:
    """Tiny-ImageNet's layout as downloaded: ``train/<wnid>/images/*.JPEG`` and ``val/images/``
    labelled by ``val/val_annotations.txt`` (file, wnid, box)."""
    for k, wnid in enumerate(("n01", "n02", "n03")):
        for i in range(2):
            _write_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (64, 64), k * 2 + i)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, (name, wnid) in enumerate(val):
        _write_image(root / "val" / "images" / name, (64, 64), 100 + i)
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_val_is_read_as_shipped(tmp_path: Path) -> None:
    val = [("val_0.JPEG", "n03"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n03")]
    root = _shipped_tiny_imagenet(tmp_path / "tiny-imagenet-200", val)
    source = build_data(ImageFolderData(root=root, num_classes=3))
    train, test = source.train(augment=False), source.test()
    assert isinstance(test, AnnotatedImages)
    assert _len(train) == 6
    assert _len(test) == 3
    # labels follow the training folder's class order (n01 -> 0, n03 -> 2)
    assert [_item(test, i)[1] for i in range(3)] == [2, 0, 2]
    assert test.classes == ["n01", "n02", "n03"]
    x, _ = _item(test, 1)
    assert x.shape == (3, 64, 64)
    # the very pixels of val_1, normalized
    ref = eval_transform(64, source.mean, source.std)(
        Image.open(root / "val" / "images" / "val_1.JPEG").convert("RGB")
    )
    torch.testing.assert_close(x, ref)
    xb, yb = next(iter(DataLoader(test, batch_size=3)))
    assert xb.shape == (3, 3, 64, 64)
    assert yb.tolist() == [2, 0, 2]
    assert test.num_skipped == 0


@pytest.mark.parametrize(
    ("annotations", "match"),
    [
        ("val_0.JPEG\tn09\t0\t0\t1\t1\n", r"val_annotations\.txt:1: class 'n09'"),
        ("val_0.JPEG\tn01\nlost.JPEG\tn02\n", r"1 image\(s\) missing .*lost\.JPEG"),
        ("val_0.JPEG\tn01\n\nval_0.JPEG n02\n", r"val_annotations\.txt:3: expected"),
        ("\n", "lists no images"),
    ],
)
def test_bad_tiny_imagenet_annotations_name_the_file_and_line(
    tmp_path: Path, annotations: str, match: str
) -> None:
    root = _shipped_tiny_imagenet(tmp_path, [("val_0.JPEG", "n01")])
    (root / "val" / "val_annotations.txt").write_text(annotations)
    source = build_data(ImageFolderData(root=root, num_classes=3))
    with pytest.raises(DataError, match=match) as info:
        source.test()
    assert info.value.__cause__ is None


def test_a_split_of_only_undecodable_images_is_a_data_error(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    for split in ("train", "val"):
        d = root / split / "a"
        d.mkdir(parents=True)
        (d / "x.png").write_bytes(b"nope")
    source = build_data(ImageFolderData(root=root, num_classes=1, image_size=16))
    with (
        pytest.warns(UserWarning, match="undecodable"),
        pytest.raises(DataError, match="no decodable image"),
    ):
        _item(source.train(), 0)


def _assert_user_facing(exc: BaseException) -> None:
    """A DataError raised fresh: no chained torchvision exception or traceback inside."""
    assert isinstance(exc, DataError)
    assert exc.__cause__ is None
    assert exc.__context__ is None
    assert "Traceback" not in str(exc)


def test_missing_imagefolder_root(tmp_path: Path) -> None:
    root = tmp_path / "no" / "such" / "tiny-imagenet"
    with pytest.raises(DataError) as info:
        build_data(ImageFolderData(root=root, num_classes=200))
    _assert_user_facing(info.value)
    assert str(root) in str(info.value)
    assert "data.root" in str(info.value)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_missing_cifar_root_names_the_path_and_both_ways_out(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "nowhere" / kind
    with pytest.raises(DataError) as info:
        build_data(CifarData.model_validate({"kind": kind, "root": root}))
    _assert_user_facing(info.value)
    msg = str(info.value)
    assert str(root) in msg
    assert "data.root" in msg
    assert "data.download" in msg
    assert ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python") in msg


def test_imagefolder_format_forced_without_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_data(CifarData(root=tmp_path, format="imagefolder"))
    _assert_user_facing(info.value)
    assert str(tmp_path) in str(info.value)


def test_corrupted_torchvision_cifar_folder_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "cifar-100-python").mkdir()
    source = build_data(CifarData(kind="cifar100", root=tmp_path))
    assert source.num_classes == 100
    assert source.mean == CIFAR100_MEAN
    with pytest.raises(DataError, match="cifar100") as info:
        source.train()
    assert str(tmp_path) in str(info.value)
    assert info.value.__cause__ is None


# ----------------------------------------------------------------------------- CIFAR-10 subset


@pytest.fixture(scope="session")
def cifar_pc2(materialize_cifar: Callable[[int], Path]) -> Path:
    """The offline CIFAR-10 copy, 2 images per class and split, as an ImageFolder tree."""
    return materialize_cifar(2)


def test_cifar10_imagefolder_subset(cifar_pc2: Path) -> None:
    source = build_data(CifarData(kind="cifar10", root=cifar_pc2))
    assert (source.name, source.num_classes, source.image_size) == ("cifar10", 10, 32)
    assert (source.mean, source.std) == (CIFAR10_MEAN, CIFAR10_STD)
    train, test = source.train(augment=False), source.test()
    assert test is not None
    assert isinstance(train, SkippingImageFolder)
    # alphabetical folder order equals CIFAR-10's label order, so labels match torchvision's
    assert train.classes == list(CIFAR10_CLASSES)
    assert _len(train) == 20
    assert _len(test) == 20
    xb, yb = next(iter(DataLoader(train, batch_size=20)))
    assert xb.shape == (20, 3, 32, 32)
    assert sorted(yb.tolist()) == sorted(list(range(10)) * 2)
    # normalized with the CIFAR-10 statistics: roughly zero mean, unit spread per channel
    means, stds = xb.mean((0, 2, 3)), xb.std((0, 2, 3))
    assert means.abs().max() < 0.6, means
    assert ((stds > 0.5) & (stds < 1.6)).all(), stds
    assert train.num_skipped == 0


def test_cifar10_augmentation_changes_pixels_not_shapes(cifar_pc2: Path) -> None:
    source = build_data(CifarData(root=cifar_pc2))
    plain, aug = source.train(augment=False), source.train(augment=True)
    torch.manual_seed(0)
    for i in (0, 7, 13):
        x0, y0 = _item(plain, i)
        views = [_item(aug, i) for _ in range(6)]
        assert all(x.shape == x0.shape == (3, 32, 32) for x, _ in views)
        assert all(y == y0 for _, y in views)
        assert any(not torch.equal(x, x0) for x, _ in views)
    # without augmentation the same item is the same tensor every time
    torch.testing.assert_close(_item(plain, 3)[0], _item(plain, 3)[0])


def test_cifar_auto_format_prefers_the_imagefolder_tree(cifar_pc2: Path) -> None:
    source = build_data(CifarData(root=cifar_pc2, format="auto"))
    assert isinstance(source.train(), SkippingImageFolder)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_data(CifarData(root=cifar_pc2, format="torchvision"))
