"""Interfaces of the distillation side (docs/design.md section 3). Protocols only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class StepOutput:
    """One student update: the loss it minimized and its named, detached parts."""

    loss: Tensor
    parts: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Distiller(Protocol):
    """``step(images [N, C, H, W]) -> StepOutput``: one optimizer step of the student."""

    def step(self, images: Tensor) -> StepOutput: ...
