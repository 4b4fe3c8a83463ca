"""Differentiable batch augmentation used during synthesis (as Fast/CMI/DeepInversion do):
a random translation (crop with zero padding, one offset per batch) and a random horizontal
flip, drawn from an explicit generator so seeded runs repeat exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["jitter_flip"]


def jitter_flip(x: Tensor, *, max_shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Shift ``x [N, C, H, W]`` by up to ``max_shift`` pixels (zero fill) and maybe flip it."""
    if max_shift > 0:
        dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
        h, w = x.shape[-2:]
        p = max_shift
        padded = F.pad(x, (p, p, p, p))
        x = padded[..., p + dy : p + dy + h, p + dx : p + dx + w]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        x = torch.flip(x, dims=(3,))
    return x
