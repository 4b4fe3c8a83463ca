"""Writing a synthetic set (stars.synthesis.export, stars.data.classes): the class split,
the labels asked of a synthesizer, the ImageFolder tree, the named grid, the staged folder."""

from __future__ import annotations

import math
import os
import signal
import string
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from PIL import Image
from torchvision.datasets import ImageFolder

from stars.config import CifarData, FastSynthesis, ImageFolderData, StarsConfig
from stars.data.classes import CIFAR10_CLASSES, class_folders, class_names
from stars.errors import StarsError
from stars.models.factory import freeze
from stars.models.teachers import CifarResNet
from stars.pipeline import save_grid
from stars.synthesis.export import (
    batch_labels,
    class_quotas,
    describe_split,
    requested_labels,
    save_labelled_grid,
    staged_output,
    take,
    write_image_folder,
)
from stars.synthesis.factory import build_synthesizer
from stars.synthesis.synthesizers import SynthesizerBase

PROPS = examples(100)


# ----------------------------------------------------------------------------- the split


@PROPS
@given(k=st.integers(1, 200), extra=st.integers(0, 5000))
def test_quotas_split_evenly_with_the_remainder_first(k: int, extra: int) -> None:
    num = k + extra
    q = class_quotas(num, k)
    assert len(q) == k and sum(q) == num
    assert max(q) - min(q) <= 1
    assert q == sorted(q, reverse=True)  # the remainder goes to the first classes
    assert sum(1 for x in q if x > num // k) == num % k


@pytest.mark.parametrize("num", [0, -3, 9])
def test_fewer_images_than_classes_is_refused(num: int) -> None:
    with pytest.raises(StarsError, match=r"--num must be at least the number of classes \(10\)"):
        class_quotas(num, 10)


def test_the_remainder_is_stated() -> None:
    names = CIFAR10_CLASSES
    assert describe_split(class_quotas(1000, 10), names) == (
        "1000 images over 10 classes: 100 per class (no remainder)"
    )
    text = describe_split(class_quotas(1003, 10), names)
    assert text == (
        "1003 images over 10 classes: 100 per class; remainder 3: one more for airplane, "
        "automobile, bird"
    )


@PROPS
@given(
    need=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    batch=st.integers(1, 64),
    start=st.integers(0, 100),
)
def test_batch_labels_ask_for_what_is_needed_round_robin(
    need: list[int], batch: int, start: int
) -> None:
    labels = batch_labels(need, batch, start)
    assert len(labels) == batch and labels == sorted(labels)
    count = Counter(labels)
    assert all(0 <= c < len(need) for c in count)
    # as many needed images as the batch can hold; the rest is padding
    assert sum(min(count[c], n) for c, n in enumerate(need)) == min(batch, sum(need))
    # balanced: a class that still needs more has at most one fewer than any other
    open_counts = [count[c] for c, n in enumerate(need) if count[c] < n]
    if open_counts:
        assert max(count[c] for c, n in enumerate(need) if n > 0) <= min(open_counts) + 1


@PROPS
@given(k=st.integers(1, 30), extra=st.integers(0, 400), batch=st.integers(1, 64))
def test_honoured_labels_fill_the_quotas_in_the_fewest_batches(
    k: int, extra: int, batch: int
) -> None:
    quotas = class_quotas(k + extra, k)
    need, kept, batches, cursor = list(quotas), Counter[int](), 0, 0
    while sum(need):
        labels = batch_labels(need, batch, cursor)  # a synthesizer that makes what it is asked
        cursor = (cursor + batch) % k
        kept.update(labels[i] for i in take(torch.tensor(labels), need))
        batches += 1
    assert [kept[c] for c in range(k)] == quotas
    assert batches == math.ceil((k + extra) / batch)


def test_take_keeps_in_order_while_a_class_needs_images() -> None:
    need = [2, 0, 1]
    assert take(torch.tensor([0, 1, -1, 2, 0, 0, 2, 7]), need) == [0, 3, 4]
    assert need == [0, 0, 0]


def _tiny_fast() -> SynthesizerBase:
    torch.manual_seed(0)
    teacher = freeze(CifarResNet(8, num_classes=4, image_size=16))
    return build_synthesizer(
        FastSynthesis(batch_size=6, nz=8, g_steps=1, warmup_epochs=0, memory_size=16),
        StarsConfig(),
        teacher=teacher,
        num_classes=4,
        image_size=16,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        device=torch.device("cpu"),
        seed=0,
    )


def test_requested_labels_steer_the_synthesizer_and_are_undone() -> None:
    synth = _tiny_fast()
    ctx = synth.ctx
    plan = [0, 0, 1, 3, 3, 3]
    with requested_labels(ctx, plan):
        step = synth.synthesize(None)
        with pytest.raises(ValueError, match="asked for 2 labels, 6 were planned"):
            ctx.labels(2)
    assert step.labels.tolist() == plan
    assert "labels" not in vars(ctx)  # the method is back
    drawn = ctx.labels(50)
    assert drawn.tolist() == sorted(drawn.tolist()) and len(set(drawn.tolist())) > 1


# ----------------------------------------------------------------------------- class names


def test_cifar_names_match_the_dataset_folders(cifar_root: Path) -> None:
    assert class_names(CifarData()) == tuple(
        sorted(p.name for p in (cifar_root / "train").iterdir())
    )
    assert len(class_names(CifarData(kind="cifar100"))) == 100


def test_imagefolder_names_come_from_the_training_folder(tmp_path: Path) -> None:
    for name in ("b_cls", "a_cls", "c_cls"):
        (tmp_path / "train" / name).mkdir(parents=True)
    data = ImageFolderData(root=tmp_path, num_classes=3)
    assert class_names(data) == ("a_cls", "b_cls", "c_cls")
    missing = ImageFolderData(root=tmp_path / "nowhere", num_classes=12)
    assert class_names(missing) == tuple(f"{i:02d}" for i in range(12))


@PROPS
@given(names=st.lists(st.text(string.printable, max_size=12), min_size=1, max_size=15))
def test_class_folders_sort_in_label_order(names: list[str]) -> None:
    folders = class_folders(names)
    assert len(folders) == len(names)
    assert list(folders) == sorted(folders) and len(set(folders)) == len(folders)
    assert all("/" not in f and "\\" not in f and f and not f.startswith(".") for f in folders)


def test_sorted_names_are_kept_as_they_are() -> None:
    assert class_folders(CIFAR10_CLASSES) == CIFAR10_CLASSES
    assert class_folders(["dog", "cat"]) == ("0_dog", "1_cat")


# ----------------------------------------------------------------------------- files


def _read(path: str) -> list[int]:
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).flatten().tolist()


def test_image_folder_round_trips_pixels_and_labels(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (7, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 1])
    counts = write_image_folder(pixels, labels, ("ant", "bee", "cat"), tmp_path)
    assert counts == [2, 2, 3]
    ds = ImageFolder(str(tmp_path))
    assert ds.class_to_idx == {"ant": 0, "bee": 1, "cat": 2}
    assert sorted(ds.targets) == sorted(labels.tolist())
    for c in range(3):
        written = sorted(_read(p) for p, y in ds.samples if y == c)
        expected = sorted(img.flatten().tolist() for img in pixels[labels == c])
        assert written == expected  # lossless


def test_grid_rows_are_named(tmp_path: Path) -> None:
    pixels = torch.full((12, 3, 8, 8), 128, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2] * 4)
    save_grid(pixels, labels, tmp_path / "g.png", per_class=4, class_names=("ant", "bee", "cat"))
    save_grid(pixels, labels, tmp_path / "plain.png", per_class=4)
    with Image.open(tmp_path / "g.png") as img, Image.open(tmp_path / "plain.png") as plain:
        named = img.convert("L")
        scale, row = 2, (8 + 1) * 2
        tiles = (4 * 9 + 1) * scale
        margin = named.width - tiles
        assert margin > 8 and named.height == (3 * 9 + 1) * scale
        assert plain.width == 4 * 9 + 1  # without names: unchanged
        for r in range(3):  # dark text in the margin of every row
            band = named.crop((0, scale + r * row, margin, scale + (r + 1) * row))
            low, _ = band.getextrema()
            assert isinstance(low, int) and low < 100
        assert named.getpixel((0, 0)) == 255  # the margin is white


def test_labelled_grid_accepts_grey_images(tmp_path: Path) -> None:
    save_labelled_grid(
        torch.zeros(2, 1, 4, 4, dtype=torch.uint8), ["x"], tmp_path / "g.png", per_row=2
    )
    with Image.open(tmp_path / "g.png") as img:
        assert img.mode == "RGB"


# ----------------------------------------------------------------------------- staged folder


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_staged_output_appears_whole(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "er" / "set"
    with staged_output(out, overwrite=False) as stage:
        (stage / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"
    assert _leftovers(out.parent) == []


def test_a_failure_leaves_no_folder_at_all(tmp_path: Path) -> None:
    out = tmp_path / "new" / "set"

    def fail() -> None:
        with staged_output(out, overwrite=False) as stage:
            (stage / "a.txt").write_text("a")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert list(tmp_path.iterdir()) == []  # not even the parent it created


def _terminated_while_writing(out: Path) -> None:
    with staged_output(out, overwrite=False) as stage:
        (stage / "a.txt").write_text("a")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this


def test_sigterm_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "set"
    with pytest.raises(SystemExit) as stopped:
        _terminated_while_writing(out)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is undone


def test_existing_content_is_kept_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "set"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(StarsError, match="--overwrite"), staged_output(out, overwrite=False):
        pass
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True):
        raise RuntimeError("fails before the swap")
    assert (out / "mine.txt").read_text() == "keep"
    with staged_output(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_output(empty, overwrite=False) as stage:  # an empty folder is fine
        (stage / "x").write_text("x")
    assert (empty / "x").is_file()


def test_unwritable_out_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    with (
        pytest.raises(StarsError, match=r"--out .* cannot write there"),
        staged_output(blocker / "set", overwrite=False),
    ):
        pass
    with pytest.raises(StarsError, match="is a file"), staged_output(blocker, overwrite=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
