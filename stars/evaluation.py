"""Evaluation on real images: top-1 of teachers (logits ``[N, K]``) and spiking students
(logits ``[T, N, K]``, predicted by the mean over T)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from stars.models.protocols import Network

__all__ = ["CPU_FORWARD_PIXELS", "forward_batch", "mean_logits", "split_batches", "top1"]

CPU_FORWARD_PIXELS = 2**18
"""``evaluation.forward_batch: auto`` on CPU: the most ``steps x images x H x W`` one
evaluation forward takes. A spiking_tiny student at T = 4 on 32 px (so 64 images a forward)
ran 1.85x faster in forwards of 50 images than of 500 on the benchmark machine
(docs/design.md section 5): at T x 500 images its activations spill the cache, and the
evaluation is no-grad, so nothing else bounds the batch."""


def forward_batch(
    setting: int | Literal["auto"], *, steps: int, image_size: int, device: torch.device
) -> int | None:
    """Images per evaluation forward: ``setting`` itself if a number; for ``auto``, on CPU the
    most that keep ``steps x images x image_size^2`` within :data:`CPU_FORWARD_PIXELS` (at
    least 1), elsewhere None (each loaded batch whole). ``steps`` is the student's T (1 for a
    network that is not spiking)."""
    if setting != "auto":
        return setting
    if device.type != "cpu":
        return None
    return max(1, CPU_FORWARD_PIXELS // (steps * image_size * image_size))


def split_batches(
    batches: Iterable[tuple[Tensor, Tensor]], size: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Each ``(images, labels)`` batch in consecutive pieces of at most ``size`` (None: whole)."""
    for x, y in batches:
        if size is None or x.shape[0] <= size:
            yield x, y
            continue
        yield from zip(torch.split(x, size), torch.split(y, size), strict=True)


def mean_logits(out: Tensor) -> Tensor:
    """``[N, K]`` unchanged; ``[T, N, K]`` averaged over T (docs/design.md tensor conventions)."""
    return out.mean(0) if out.dim() == 3 else out


@torch.no_grad()
def top1(
    model: Network,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    max_images: int | None = None,
    chunk: int | None = None,
) -> float:
    """Top-1 accuracy in percent over ``batches`` of ``(images, labels)``, each run in
    forwards of at most ``chunk`` images (None: whole; see :func:`forward_batch`). In eval
    mode every image's logits are its own, so ``chunk`` changes only the speed."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in split_batches(batches, chunk):
            if max_images is not None and total >= max_images:
                break
            if max_images is not None:
                x, y = x[: max_images - total], y[: max_images - total]
            pred = mean_logits(model(x.to(device))).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    return 100.0 * correct / max(total, 1)
