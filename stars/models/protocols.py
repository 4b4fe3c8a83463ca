"""Interfaces of teachers and spiking students (docs/design.md section 3). Protocols only.

These are the types at the seams: the synthesizers, the objective, the distiller and the
pipeline take a :class:`Teacher` and a :class:`SpikingStudent`, not an ``nn.Module``, so that
``teacher.bn_layers()`` and ``student.forward_features(x)`` are checked calls. Both extend
:class:`Network`, the part of ``torch.nn.Module``'s surface those seams use; every
``nn.Module`` has it, so a teacher or student is still a module wherever one is needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, Self, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Network(Protocol):
    """The ``nn.Module`` surface the seams use: a call on images, train/eval mode, the
    parameters, buffers and submodules, and the state dict."""

    training: bool

    def __call__(self, x: Tensor) -> Tensor: ...

    def train(self, mode: bool = True) -> Self: ...

    def eval(self) -> Self: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any: ...


@runtime_checkable
class Teacher(Network, Protocol):
    """An ANN classifier with BatchNorm.

    - ``__call__(x)``: images ``[N, C, H, W]`` -> logits ``[N, K]``.
    - ``forward_features(x)``: ``(features [N, D], logits [N, K])``, where ``features`` is the
      penultimate representation (after global pooling, before the classifier).
    - ``bn_layers()``: every BatchNorm2d in forward order (the layers DeepInversion matches).
    """

    num_classes: int

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def bn_layers(self) -> list[nn.BatchNorm2d]: ...


@runtime_checkable
class SpikingStudent(Network, Protocol):
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

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def bn_layers(self) -> list[nn.Module]: ...

    def spiking_neurons(self) -> list[tuple[str, nn.Module]]: ...
