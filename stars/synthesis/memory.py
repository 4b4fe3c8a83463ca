"""The memory bank of synthesized images that the distiller reads from.

Images are stored as uint8 pixels (what Fast/CMI write to disk as PNG), so the bank costs
``3*H*W`` bytes an image; ``add`` takes normalized images and ``sample`` returns normalized
images. When full, the oldest images are replaced first (a ring buffer); ``sample`` draws
uniformly with replacement from what is stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["MemoryBank"]


class MemoryBank:
    """A bounded ring buffer of images ``[C, H, W]`` with optional labels."""

    def __init__(self, capacity: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._mean = torch.tensor(list(mean)).view(1, -1, 1, 1)
        self._std = torch.tensor(list(std)).view(1, -1, 1, 1)
        self._images: Tensor | None = None
        self._labels: Tensor | None = None
        self._size = 0
        self._next = 0

    def __len__(self) -> int:
        return self._size

    def to_pixels(self, images: Tensor) -> Tensor:
        """Normalized ``[N, C, H, W]`` -> uint8 pixels (clamped to [0, 255])."""
        x = images.detach().float().cpu() * self._std + self._mean
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    def to_normalized(self, pixels: Tensor) -> Tensor:
        """uint8 pixels ``[N, C, H, W]`` -> float normalized images."""
        return (pixels.float() / 255 - self._mean) / self._std

    def add(self, images: Tensor, labels: Tensor | None = None) -> None:
        """Store a batch of normalized images ``[N, C, H, W]`` (and labels ``[N]``)."""
        pix = self.to_pixels(images)
        n = pix.shape[0]
        if self._images is None:
            self._images = torch.empty((self.capacity, *pix.shape[1:]), dtype=torch.uint8)
            self._labels = torch.full((self.capacity,), -1, dtype=torch.long)
        assert self._labels is not None
        lab = labels.detach().cpu().long() if labels is not None else torch.full((n,), -1)
        if n >= self.capacity:
            pix, lab, n = pix[-self.capacity :], lab[-self.capacity :], self.capacity
        idx = (torch.arange(n) + self._next) % self.capacity
        self._images[idx] = pix
        self._labels[idx] = lab
        self._next = int((self._next + n) % self.capacity)
        self._size = min(self.capacity, self._size + n)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` normalized images drawn uniformly with replacement."""
        return self.sample_with_labels(n, generator=generator)[0]

    def sample_with_labels(
        self, n: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` normalized images and their labels (-1 when unknown)."""
        if self._size == 0 or self._images is None or self._labels is None:
            raise RuntimeError("the memory bank is empty: synthesize before sampling")
        idx = torch.randint(0, self._size, (n,), generator=generator)
        return self.to_normalized(self._images[idx]), self._labels[idx]

    def pixels(self) -> Tensor:
        """All stored images as uint8 ``[size, C, H, W]`` (oldest first)."""
        if self._images is None:
            return torch.empty(0, dtype=torch.uint8)
        if self._size < self.capacity:
            return self._images[: self._size]
        return torch.roll(self._images, -self._next, dims=0)

    def labels(self) -> Tensor:
        """The labels matching :meth:`pixels`."""
        if self._labels is None:
            return torch.empty(0, dtype=torch.long)
        if self._size < self.capacity:
            return self._labels[: self._size]
        return torch.roll(self._labels, -self._next, dims=0)

    def state_dict(self) -> dict[str, Any]:
        return {"pixels": self.pixels().clone(), "labels": self.labels().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pix, lab = state["pixels"], state["labels"]
        self._images = self._labels = None
        self._size = self._next = 0
        if pix.numel():
            self._images = torch.empty((self.capacity, *pix.shape[1:]), dtype=torch.uint8)
            self._labels = torch.full((self.capacity,), -1, dtype=torch.long)
            n = min(pix.shape[0], self.capacity)
            self._images[:n] = pix[-n:]
            self._labels[:n] = lab[-n:]
            self._size = n
            self._next = n % self.capacity
