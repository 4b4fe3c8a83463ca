"""How much optimization a synthesizer gets when it makes a stand-alone dataset.

``stars distill`` spreads a method's optimization over the run; ``stars synthesize`` has no
run, so it gives each method the budget its config describes before any image is kept:

- Fast: its warm-up (``synthesis.warmup_epochs x distill.synthesis_steps_per_epoch``
  batches, meta-learning the shared generator and the momentum BN statistics; their images
  are dropped), then ``synthesis.g_steps`` generator steps for every kept batch.
- DeepInversion: ``synthesis.iterations`` pixel steps for every batch (no warm-up: each batch
  starts from noise).
- DAFL and DFAD: their persistent generator is trained for as many calls as a distill run
  makes (``distill.epochs x distill.synthesis_steps_per_epoch``, images dropped), then
  ``synthesis.g_steps`` steps for every kept batch.
- Any other method: what its config's hooks say
  (:meth:`~stars.synthesis.methods.MethodConfig.teacher_only_warmup`,
  :attr:`~stars.synthesis.methods.MethodConfig.steps_field`): by default no warm-up.

``scale`` (``stars synthesize --steps``) multiplies both numbers (warm-up batches rounded
up, steps per batch rounded, at least 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stars.config import RunConfig
from stars.errors import StarsError

__all__ = ["Budget", "budget_config", "method_budget"]


@dataclass(frozen=True)
class Budget:
    """The optimization a stand-alone synthesis gets.

    Attributes:
        warmup_batches: synthesizer calls before the first kept batch (images dropped).
        steps_per_batch: inner optimization steps of every call (warm-up ones included).
        steps_field: the config field that holds ``steps_per_batch`` (``g_steps`` or
            ``iterations``), or ``None`` for a method without one.
        scale: the factor applied to the method's own budget.
    """

    warmup_batches: int
    steps_per_batch: int
    steps_field: str | None
    scale: float = 1.0

    def describe(self) -> str:
        """One line for the console: what runs before and for each kept batch."""
        field = self.steps_field or "steps"
        scaled = "" if self.scale == 1.0 else f" (x{self.scale:g} of the config's budget)"
        return (
            f"{self.warmup_batches} warm-up batch(es) dropped, then {self.steps_per_batch} "
            f"{field} per kept batch{scaled}"
        )


def _scaled_steps(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def _scaled_batches(batches: int, scale: float) -> int:
    # 1e-9: 2 x 1.5 is 3 batches, not 4 from the float product's last digit.
    return max(0, math.ceil(batches * scale - 1e-9))


def method_budget(cfg: RunConfig, scale: float = 1.0) -> Budget:
    """The budget of ``cfg.synthesis`` (see the module docstring), scaled by ``scale``.

    Raises:
        StarsError: ``scale`` is not a positive finite number, or the method has no
            objective without a student (DFAD with ``bn_weight`` and ``oh_weight`` 0).
    """
    if not (math.isfinite(scale) and scale > 0):
        raise StarsError(f"--steps must be a positive number (a factor), got {scale}")
    syn, per_epoch = cfg.synthesis, cfg.distill.synthesis_steps_per_epoch
    warm = syn.teacher_only_warmup(epochs=cfg.distill.epochs, per_epoch=per_epoch)
    steps, field = syn.steps_per_batch, syn.steps_field
    return Budget(
        warmup_batches=_scaled_batches(warm, scale),
        steps_per_batch=_scaled_steps(steps, scale),
        steps_field=field,
        scale=scale,
    )


def budget_config(cfg: RunConfig, budget: Budget) -> RunConfig:
    """``cfg`` with the synthesis block's steps per batch set to ``budget.steps_per_batch``
    (the synthesizer is then built from it as usual: Fast's meta learning rate, which scales
    with ``g_steps``, follows)."""
    if budget.steps_field is None:
        return cfg
    synthesis = cfg.synthesis.model_copy(update={budget.steps_field: budget.steps_per_batch})
    return cfg.model_copy(update={"synthesis": synthesis})
