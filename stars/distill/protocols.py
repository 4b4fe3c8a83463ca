"""Interfaces of the distillation side (docs/design.md section 3). Protocols only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepOutput:
    """One student update: the loss it minimized and its named, detached parts."""

    loss: Tensor
    parts: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Distiller(Protocol):
    """Trains the student on synthetic batches.

    - ``step(images [N, C, H, W]) -> StepOutput``: one optimizer step of the student (a step
      whose loss or gradients are not finite changes nothing and is counted).
    - :attr:`optimizer`: the student's optimizer (its learning rate is logged).
    - :attr:`skipped`: non-finite steps so far; :attr:`bad_in_a_row`: the current run of them.
    - ``state_dict()`` / ``load_state_dict()``: the optimizer, schedule and random state.
    """

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def skipped(self) -> int: ...

    @property
    def bad_in_a_row(self) -> int: ...

    def step(self, images: Tensor) -> StepOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
