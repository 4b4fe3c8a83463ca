"""Interfaces of teachers and spiking students (docs/design.md section 3). Protocols only."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Teacher(Protocol):
    """An ANN classifier with BatchNorm.

    - ``__call__(x)``: images ``[N, C, H, W]`` -> logits ``[N, K]``.
    - ``forward_features(x)``: ``(features [N, D], logits [N, K])``, where ``features`` is the
      penultimate representation (after global pooling, before the classifier).
    - ``bn_layers()``: every BatchNorm2d in forward order (the layers DeepInversion matches).
    """

    num_classes: int

    def __call__(self, x: Tensor) -> Tensor: ...

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def bn_layers(self) -> list[nn.BatchNorm2d]: ...


@runtime_checkable
class SpikingStudent(Protocol):
    """A spiking classifier run for ``T`` steps with direct encoding.

    - ``__call__(x)``: images ``[N, C, H, W]`` -> ``logits_seq [T, N, K]`` (predict with the
      mean over T).
    - ``forward_features(x)``: ``(features_seq [T, N, D], logits_seq [T, N, K])``, the
      penultimate firing rates / features per step.
    - ``bn_layers()``: every BatchNorm in forward order.
    - ``spiking_neurons()``: ``(name, neuron)`` for each spiking layer in forward order, for
      firing-rate statistics and pre-spike taps.
    """

    num_classes: int
    T: int

    def __call__(self, x: Tensor) -> Tensor: ...

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def bn_layers(self) -> list[nn.Module]: ...

    def spiking_neurons(self) -> list[tuple[str, nn.Module]]: ...
