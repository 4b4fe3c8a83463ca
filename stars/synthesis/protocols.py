"""Interfaces of the synthesis side (docs/design.md section 3). Protocols only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from torch import Tensor, nn

if TYPE_CHECKING:
    from stars.models.protocols import SpikingStudent
    from stars.synthesis.memory import MemoryBank
    from stars.synthesis.objective import SynthesisObjective


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


_V_co = TypeVar("_V_co", covariant=True)


@runtime_checkable
class Tap(Protocol[_V_co]):
    """A context manager over forward hooks: registers on enter, always removes on exit.

    ``with tap as captured:`` yields a mapping from module to what it saw during the forward
    passes inside the block (``Tap[Tensor]``: :class:`~stars.synthesis.priors.FeatureTap`,
    :class:`~stars.neurons.membrane.MembraneTap`; ``Tap[tuple[Tensor, Tensor]]``:
    :class:`~stars.synthesis.priors.BatchStatsTap`); nothing is kept after exit.
    """

    def __enter__(self) -> Mapping[nn.Module, _V_co]: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Generator(Protocol):
    """``forward(z [N, nz], y [N] | None) -> images [N, C, H, W]`` in the normalized image
    space. ``y`` conditions a generator with class embeddings and may be left out; a
    generator that is itself the images (DeepInversion's :class:`PixelGenerator`) ignores both."""

    def __call__(self, z: Tensor, y: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class Synthesizer(Protocol):
    """Produces surrogate batches from the teacher, steered by the current student.

    - ``synthesize(student)`` runs one synthesis step (the student's parameters and BN
      buffers are not changed; ``None``: the teacher alone) and, while :attr:`store` is set,
      adds the batch to the memory bank when it is finite.
    - ``sample(n)`` draws ``n`` images uniformly from the bank; :attr:`bank` is the bank
      itself (a data-parallel run adds every rank's share to it, with :attr:`store` off).
    - ``set_epoch(epoch)``: the per-epoch hook, called with the 0-based epoch before the
      epoch's first step (``stars.schedule``, Fast's warm-up).
    - :attr:`objective`: the generator objective, for gradient measurements.
    - ``state_dict()`` / ``load_state_dict()``: everything a resumed run needs (the bank,
      the random state, generators and optimizers), as checkpoint-safe values; the
      context's state under ``"ctx"``, so a data-parallel checkpoint can keep one bank for
      all ranks (:func:`stars.synthesis.synthesizers.without_bank` / ``with_bank``).
    """

    store: bool

    @property
    def bank(self) -> MemoryBank: ...

    @property
    def objective(self) -> SynthesisObjective: ...

    def set_epoch(self, epoch: int) -> None: ...

    def synthesize(self, student: SpikingStudent | None) -> SynthesisStep: ...

    def sample(self, n: int) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


__all__ = ["Generator", "SynthesisStep", "Synthesizer", "Tap"]
