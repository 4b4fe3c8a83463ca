"""Evaluation on real images: top-1 of teachers (logits ``[N, K]``) and spiking students
(logits ``[T, N, K]``, predicted by the mean over T)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from stars.models.protocols import Network

__all__ = ["mean_logits", "top1"]


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
) -> float:
    """Top-1 accuracy in percent over ``batches`` of ``(images, labels)``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in batches:
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
