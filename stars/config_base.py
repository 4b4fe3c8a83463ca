"""The torch-free base of every configuration model: frozen pydantic models that forbid
unknown keys, the ``kind`` discriminator of the unions, and the constrained number types.

:mod:`stars.config` (the run configuration) and :mod:`stars.synthesis.methods` (the
synthesis methods' configs) both build on it; neither imports torch, so ``stars --help`` and
``stars config validate`` stay fast.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field

__all__ = ["Frozen", "NonNegFloat", "PosFloat", "PosInt", "Probability", "kind_of"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


def kind_of(default: str, tags: dict[str, str] | None = None) -> Discriminator:
    """Discriminate a union on ``kind``; a missing ``kind`` means ``default``.

    ``tags`` maps kinds to the tag of the member that carries several kinds
    (``cifar10``/``cifar100`` -> ``cifar``).
    """
    mapping = tags or {}

    def pick(value: Any) -> str:
        kind = (
            value.get("kind", default)
            if isinstance(value, dict)
            else getattr(value, "kind", default)
        )
        return mapping.get(str(kind), str(kind))

    return Discriminator(pick)


PosInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
PosFloat = Annotated[float, Field(gt=0.0)]
Probability = Annotated[float, Field(gt=0.0, lt=1.0)]
