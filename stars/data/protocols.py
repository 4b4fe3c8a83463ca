"""Interfaces of the data side (docs/design.md section 3). Protocols only."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch.utils.data import Dataset


@runtime_checkable
class DataSource(Protocol):
    """A labelled image source with its normalization.

    ``train(augment)`` and ``test()`` return datasets of ``(image [C, H, W] normalized with
    ``mean`` and ``std``, label)``; ``test()`` is None when the source has no test split.
    ``name`` is the dataset's name (``cifar10``, ``cifar100``, ``imagefolder``).
    """

    @property
    def name(self) -> str: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def mean(self) -> tuple[float, float, float]: ...

    @property
    def std(self) -> tuple[float, float, float]: ...

    def train(self, augment: bool = True) -> Dataset[Any]: ...

    def test(self) -> Dataset[Any] | None: ...
