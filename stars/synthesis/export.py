"""Writing a synthetic dataset: class quotas, the labels each batch is asked for, the
ImageFolder tree, the grid with class names, and an output folder that appears whole or not
at all.

The class split: ``num`` images over ``K`` classes is ``num // K`` per class, and the first
``num % K`` classes get one more (:func:`class_quotas`). A synthesizer that draws its labels
through ``SynthesisContext.labels`` (Fast, DeepInversion, DFAD's class term) is asked for the
labels the quotas still need (:func:`batch_labels`, :func:`requested_labels`); one that
labels its images itself (DAFL, DFAD: the teacher's argmax) fills the quotas from what it
makes (:func:`take`).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch
from torch import Tensor

from stars.errors import StarsError
from stars.synthesis.synthesizers import SynthesisContext

__all__ = [
    "batch_labels",
    "class_quotas",
    "describe_split",
    "requested_labels",
    "save_labelled_grid",
    "staged_output",
    "take",
    "write_image_folder",
]


# ----------------------------------------------------------------------------- class split


def class_quotas(num: int, num_classes: int) -> list[int]:
    """Images per class: ``num // K`` each, one more for the first ``num % K`` classes.

    Raises:
        StarsError: ``num < num_classes`` (some class would get no image; this covers
            ``--num 0``) or ``num_classes < 1``.
    """
    if num_classes < 1:
        raise StarsError(f"the dataset has {num_classes} classes; nothing to synthesize")
    if num < num_classes:
        raise StarsError(
            f"--num must be at least the number of classes ({num_classes}), so that every "
            f"class gets an image; got {num}"
        )
    base, extra = divmod(num, num_classes)
    return [base + (1 if c < extra else 0) for c in range(num_classes)]


def describe_split(quotas: Sequence[int], names: Sequence[str]) -> str:
    """One sentence stating the split and its remainder, e.g. ``1003 images over 10 classes:
    100 per class; remainder 3: one more for airplane, automobile, bird``."""
    num, k = sum(quotas), len(quotas)
    base = min(quotas)
    extra = [names[c] for c, q in enumerate(quotas) if q > base]
    text = f"{num} images over {k} classes: {base} per class"
    if not extra:
        return text + " (no remainder)"
    shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    return text + f"; remainder {len(extra)}: one more for {shown}"


def batch_labels(need: Sequence[int], batch_size: int, start: int = 0) -> list[int]:
    """The labels to ask a synthesizer for, sorted: round-robin from class ``start`` over the
    classes that still need images, at most ``need[c]`` of class ``c``; when fewer than
    ``batch_size`` are needed, the rest continues round-robin over all classes (their
    images are not kept), so every batch has the configured size and BN statistics."""
    k = len(need)
    left = list(need)
    out: list[int] = []
    c = start % k
    while len(out) < batch_size and any(n > 0 for n in left):
        if left[c] > 0:
            out.append(c)
            left[c] -= 1
        c = (c + 1) % k
    while len(out) < batch_size:
        out.append(c)
        c = (c + 1) % k
    return sorted(out)


def take(labels: Tensor, need: list[int]) -> list[int]:
    """Indices of ``labels [N]`` kept for the quotas, in order: an image is kept while its
    class still needs images. ``need`` is decremented in place; labels outside
    ``0..K-1`` (-1: unknown) are never kept."""
    keep: list[int] = []
    for i, y in enumerate(labels.tolist()):
        if 0 <= y < len(need) and need[y] > 0:
            keep.append(i)
            need[y] -= 1
    return keep


@contextmanager
def requested_labels(ctx: SynthesisContext, labels: Sequence[int]) -> Iterator[None]:
    """Inside the block, ``ctx.labels(n)`` (a :class:`~stars.synthesis.synthesizers.
    SynthesisContext`) returns ``labels`` on the context's device instead of drawing random
    ones; the method is restored on exit.

    Raises:
        ValueError: inside the block, when asked for a number of labels other than
            ``len(labels)``.
    """
    wanted = torch.tensor(list(labels), dtype=torch.long, device=ctx.device)

    def planned(n: int) -> Tensor:
        if n != wanted.shape[0]:
            raise ValueError(f"asked for {n} labels, {wanted.shape[0]} were planned")
        return wanted.clone()

    # An instance attribute shadows the method; deleting it brings the method back.
    ctx.labels = planned  # type: ignore[method-assign]
    try:
        yield
    finally:
        del ctx.labels


# ----------------------------------------------------------------------------- files


def write_image_folder(
    pixels: Tensor, labels: Tensor, folders: Sequence[str], root: Path
) -> list[int]:
    """Write uint8 images ``pixels [N, C, H, W]`` as ``root/<folders[label]>/<j>.png``
    (``j`` counts within the class), lossless PNG (Pillow). Every class gets its folder.
    Returns the number of images written per class.
    """
    from PIL import Image

    counts = [0] * len(folders)
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(pixels.shape[0])))
    for img, y in zip(pixels, labels.tolist(), strict=True):
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(
            root / folders[y] / f"{counts[y]:0{width}d}.png"
        )
        counts[y] += 1
    return counts


def save_labelled_grid(
    pixels: Tensor, names: Sequence[str], path: Path, *, per_row: int, scale: int = 2
) -> None:
    """A PNG of uint8 images ``pixels [R * per_row, C, H, W]``, one row per entry of
    ``names``, each row's name written in a left margin; images enlarged ``scale`` times
    (nearest neighbour, no smoothing)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    grid = make_grid(pixels, nrow=per_row, padding=1, pad_value=0)
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    tile = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())
    tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
    row_h = (pixels.shape[-2] + 1) * scale
    font = ImageFont.load_default(size=max(10, min(row_h // 2, 16)))
    draw = ImageDraw.Draw(tile)
    margin = 8 + max((int(draw.textlength(n, font=font)) for n in names), default=0)
    canvas = Image.new("RGB", (tile.width + margin, tile.height), "white")
    canvas.paste(tile, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        centre = scale + r * row_h + row_h // 2
        draw.text((4, centre), name, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


@contextmanager
def staged_output(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into; it becomes ``out`` when the block
    finishes, and is removed (with any parent folder it created) when the block raises or
    the process gets SIGINT / SIGTERM (then ``SystemExit(143)``), so ``out`` appears whole or
    not at all. An existing ``out`` is replaced only on success.

    Raises:
        StarsError: ``out`` is a file, exists with content and ``overwrite`` is false, or
            cannot be created (the message names ``--out`` and the reason).
    """
    if out.exists() and not out.is_dir():
        raise StarsError(f"--out {out} is a file; give a folder (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise StarsError(
            f"--out {out} already exists and is not empty; pass --overwrite to replace it, "
            "or choose another folder"
        )
    created: list[Path] = []
    parent = out.absolute().parent
    for p in (parent, *parent.parents):
        if p.exists():
            break
        created.append(p)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
        stage.chmod(0o755)  # mkdtemp's 0o700 would outlive the rename
    except OSError as exc:
        _remove_empty(created)
        raise StarsError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    try:
        with _sigterm_exits():
            yield stage
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            out.rename(old / "content")
            stage.rename(out)
            shutil.rmtree(old)
        else:
            stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` inside the block (main thread only), so a killed
    command still removes its staged folder (SIGINT already raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders ``staged_output`` created, deepest first, if they are empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return
