"""A method's own budget for stand-alone synthesis (stars.synthesis.budget)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples

from stars.config import RunConfig
from stars.errors import StarsError
from stars.synthesis.budget import budget_config, method_budget


def _cfg(synthesis: dict[str, Any], epochs: int = 30, per_epoch: int = 2) -> RunConfig:
    return RunConfig.model_validate(
        {
            "synthesis": synthesis,
            "distill": {"epochs": epochs, "synthesis_steps_per_epoch": per_epoch},
        }
    )


def test_fast_gets_its_warmup_then_its_generator_steps() -> None:
    cfg = _cfg({"kind": "fast", "g_steps": 4, "warmup_epochs": 3})
    b = method_budget(cfg)
    assert (b.warmup_batches, b.steps_per_batch, b.steps_field) == (6, 4, "g_steps")
    scaled = method_budget(cfg, 2.5)
    assert (scaled.warmup_batches, scaled.steps_per_batch) == (15, 10)
    assert "15 warm-up batch(es) dropped, then 10 g_steps" in scaled.describe()
    assert "x2.5" in scaled.describe()


def test_deepinversion_gets_its_iterations_and_no_warmup() -> None:
    b = method_budget(_cfg({"kind": "deepinversion", "iterations": 300}), 0.5)
    assert (b.warmup_batches, b.steps_per_batch, b.steps_field) == (0, 150, "iterations")


@pytest.mark.parametrize("kind", ["dafl", "dfad"])
def test_persistent_generators_train_as_long_as_a_run(kind: str) -> None:
    b = method_budget(_cfg({"kind": kind, "g_steps": 3, "bn_weight": 1.0}, epochs=7))
    assert (b.warmup_batches, b.steps_per_batch) == (14, 3)


def test_dfad_without_a_teacher_only_term_is_refused() -> None:
    with pytest.raises(StarsError, match=r"dfad learns only against a student.*--from-run"):
        method_budget(_cfg({"kind": "dfad"}))


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf])
def test_bad_scale_is_refused(scale: float) -> None:
    with pytest.raises(StarsError, match="--steps must be a positive number"):
        method_budget(_cfg({"kind": "fast"}), scale)


@examples(100)
@given(
    g_steps=st.integers(1, 50),
    warmup=st.integers(0, 30),
    a=st.floats(0.01, 20),
    b=st.floats(0.01, 20),
)
def test_a_larger_scale_never_gives_less(g_steps: int, warmup: int, a: float, b: float) -> None:
    cfg = _cfg({"kind": "fast", "g_steps": g_steps, "warmup_epochs": warmup}, per_epoch=1)
    lo, hi = sorted((a, b))
    small, large = method_budget(cfg, lo), method_budget(cfg, hi)
    assert 1 <= small.steps_per_batch <= large.steps_per_batch
    assert 0 <= small.warmup_batches <= large.warmup_batches
    assert small.warmup_batches >= warmup * lo - 1e-6  # rounded up, never down


def test_budget_config_changes_only_the_steps() -> None:
    cfg = _cfg({"kind": "fast", "g_steps": 4, "lr_g": 0.004})
    out = budget_config(cfg, method_budget(cfg, 3.0))
    assert out.synthesis.g_steps == 12  # type: ignore[union-attr]
    assert out.synthesis.model_copy(update={"g_steps": 4}) == cfg.synthesis
    assert out.model_copy(update={"synthesis": cfg.synthesis}) == cfg
