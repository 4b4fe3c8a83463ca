"""Interfaces of the data side. Protocols only."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch.utils.data import Dataset


@runtime_checkable
class DataSource(Protocol):
    """A labelled image source with its normalization.

    ``train(augment)`` and ``test()`` return datasets of ``(image [C, H, W] normalized,
    label)``; ``test()`` is None when the source has no test split.
    """

    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def train(self, augment: bool = True) -> Dataset[tuple[object, int]]: ...

    def test(self) -> Dataset[tuple[object, int]] | None: ...
