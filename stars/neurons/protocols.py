"""Interfaces of spiking neurons (docs/design.md section 3). Protocols only, no code."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class SpikingNeuron(Protocol):
    """A multi-step spiking neuron.

    ``forward(x_seq)`` takes input currents ``x_seq: [T, N, *]`` and returns spikes
    ``[T, N, *]`` of exactly 0.0 / 1.0 with a surrogate gradient. Every call starts from a
    fresh membrane state: no state leaks between calls and no caller needs ``reset_net``.
    """

    v_threshold: float

    def __call__(self, x_seq: Tensor) -> Tensor: ...
