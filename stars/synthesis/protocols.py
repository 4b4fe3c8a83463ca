"""Interfaces of the synthesis side (docs/design.md section 3). Protocols only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@dataclass(frozen=True)
class SynthesisStep:
    """What one synthesis step produced.

    Attributes:
        images: ``[N, C, H, W]`` in the teacher's normalized input space, detached.
        labels: ``[N]`` the class labels the images were synthesized for.
        losses: each objective term by name (unweighted, detached floats) of the last inner
            iteration, and ``total`` (weighted).
        trace: the weighted objective at every inner iteration, in order.
    """

    images: Tensor
    labels: Tensor
    losses: Mapping[str, float] = field(default_factory=dict)
    trace: tuple[float, ...] = ()
    finite: bool = True
    """False when the images or the objective were not finite; such a batch is not stored."""


@runtime_checkable
class FeatureTap(Protocol):
    """A context manager over forward hooks: registers on enter, always removes on exit.

    ``with tap as captured:`` yields a mapping from module to what it saw during the forward
    passes inside the block; nothing is kept after exit.
    """

    def __enter__(self) -> Mapping[nn.Module, Tensor]: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class PriorExtractor(Protocol):
    """Reads a teacher once (no data) and returns a frozen prior."""

    def __call__(self, teacher: nn.Module) -> Any: ...


@runtime_checkable
class Generator(Protocol):
    """``forward(z [N, nz], y [N]) -> images [N, C, H, W]`` in the normalized image space."""

    def __call__(self, z: Tensor, y: Tensor) -> Tensor: ...


@runtime_checkable
class Synthesizer(Protocol):
    """Produces surrogate batches from the teacher, steered by the current student.

    ``synthesize(student)`` runs one synthesis step (the student's parameters and BN buffers
    are not changed) and adds the images to the memory bank; ``sample(n)`` draws ``n``
    images uniformly from the bank.
    """

    def synthesize(self, student: nn.Module) -> SynthesisStep: ...

    def sample(self, n: int) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


__all__ = ["FeatureTap", "Generator", "PriorExtractor", "SynthesisStep", "Synthesizer"]
