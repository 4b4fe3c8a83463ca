"""``build_synthesizer(cfg, ...)``: the synthesizer a config's ``kind`` names, with STARS."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stars.config import StarsConfig, SynthesisConfig
from stars.models.protocols import Teacher
from stars.synthesis.objective import SynthesisObjective, TermWeights
from stars.synthesis.synthesizers import SynthesisContext, SynthesizerBase

__all__ = ["build_synthesizer", "term_weights"]


def term_weights(cfg: SynthesisConfig) -> TermWeights:
    """The baseline's term weights for a synthesis config (its method's own terms)."""
    return cfg.term_weights()


def build_synthesizer(
    cfg: SynthesisConfig,
    stars: StarsConfig,
    *,
    teacher: Teacher,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    seed: int,
    student_vth: float | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> SynthesizerBase:
    """Build the synthesizer of ``cfg.kind`` around a frozen ``teacher``
    (:meth:`~stars.synthesis.methods.MethodConfig.build`).

    Args:
        cfg: the synthesis block of the run config.
        stars: the STARS plug-in (all weights 0: the plain baseline).
        teacher: frozen teacher with ``forward_features`` and ``bn_layers()``.
        num_classes, image_size, mean, std: the teacher's data geometry and normalization.
        device: where synthesis runs.
        seed: seeds the synthesizer's own random generator (and the generator weights).
        student_vth: the student's firing threshold (TAR ``source: student-vth``).
        precision: ``bf16`` runs the teacher and student forwards under autocast.
        channels_last: the methods' generators run in channels-last memory format
            (:meth:`SynthesisContext.generate`).
        compile: the objective's BN statistics go through ``torch.compile``
            (``compile: true``; :func:`~stars.synthesis.priors.compiled_batch_stats`).
    """
    objective = SynthesisObjective(
        teacher,
        weights=cfg.term_weights(),
        stars=stars,
        student_vth=student_vth,
        bn_momentum=cfg.matching_momentum,
        precision=precision,
        compile=compile,
    )
    ctx = SynthesisContext(
        teacher,
        objective,
        num_classes=num_classes,
        image_size=image_size,
        mean=mean,
        std=std,
        batch_size=cfg.batch_size,
        memory_size=cfg.memory_size,
        device=device,
        seed=seed,
        channels_last=channels_last,
    )

    return cfg.build(ctx)
