"""``build_synthesizer(cfg, ...)``: the synthesizer a config's ``kind`` names, with STARS."""

from __future__ import annotations

from collections.abc import Sequence
from typing import assert_never

import torch

from stars.config import (
    DAFLSynthesis,
    DeepInversionSynthesis,
    DFADSynthesis,
    FastSynthesis,
    StarsConfig,
    SynthesisConfig,
)
from stars.models.protocols import Teacher
from stars.synthesis.generators import ConvGenerator
from stars.synthesis.objective import SynthesisObjective, TermWeights
from stars.synthesis.synthesizers import (
    DAFLSynthesizer,
    DeepInversionSynthesizer,
    DFADSynthesizer,
    FastSynthesizer,
    SynthesisContext,
)

__all__ = ["AnySynthesizer", "build_synthesizer", "term_weights"]

AnySynthesizer = DeepInversionSynthesizer | DAFLSynthesizer | DFADSynthesizer | FastSynthesizer


def term_weights(cfg: SynthesisConfig) -> TermWeights:
    """The baseline's term weights for a synthesis config."""
    match cfg:
        case DeepInversionSynthesis():
            return TermWeights(
                bn=cfg.bn_weight,
                oh=cfg.oh_weight,
                adv=cfg.adv_weight,
                tv_l1=cfg.tv_l1_weight,
                tv_l2=cfg.tv_l2_weight,
                l2=cfg.l2_weight,
            )
        case DAFLSynthesis():
            return TermWeights(
                bn=cfg.bn_weight,
                oh=cfg.oh_weight,
                act=cfg.act_weight,
                ie=cfg.ie_weight,
                pseudo_labels=True,
            )
        case DFADSynthesis():
            return TermWeights(bn=cfg.bn_weight, oh=cfg.oh_weight, dfad=1.0)
        case FastSynthesis():
            return TermWeights(bn=cfg.bn_weight, oh=cfg.oh_weight, adv=cfg.adv_weight)
        case _:
            assert_never(cfg)


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
) -> AnySynthesizer:
    """Build the synthesizer of ``cfg.kind`` around a frozen ``teacher``.

    Args:
        cfg: the synthesis block of the run config.
        stars: the STARS plug-in (all weights 0: the plain baseline).
        teacher: frozen teacher with ``forward_features`` and ``bn_layers()``.
        num_classes, image_size, mean, std: the teacher's data geometry and normalization.
        device: where synthesis runs.
        seed: seeds the synthesizer's own random generator (and the generator weights).
        student_vth: the student's firing threshold (TAR ``source: student-vth``).
        precision: ``bf16`` runs the teacher and student forwards under autocast.
    """
    bn_momentum = cfg.bn_momentum if isinstance(cfg, FastSynthesis) else 0.0
    objective = SynthesisObjective(
        teacher,
        weights=term_weights(cfg),
        stars=stars,
        student_vth=student_vth,
        bn_momentum=bn_momentum,
        precision=precision,
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
    )

    def generator(nz: int) -> ConvGenerator:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ConvGenerator(nz, image_size=image_size, mean=mean, std=std)

    match cfg:
        case DeepInversionSynthesis():
            return DeepInversionSynthesizer(
                ctx, iterations=cfg.iterations, lr=cfg.lr, jitter=cfg.jitter, flip=cfg.flip
            )
        case DAFLSynthesis():
            return DAFLSynthesizer(ctx, generator(cfg.nz), lr_g=cfg.lr_g, g_steps=cfg.g_steps)
        case DFADSynthesis():
            return DFADSynthesizer(ctx, generator(cfg.nz), lr_g=cfg.lr_g, g_steps=cfg.g_steps)
        case FastSynthesis():
            return FastSynthesizer(
                ctx,
                generator(cfg.nz),
                lr_g=cfg.lr_g,
                lr_z=cfg.lr_z,
                g_steps=cfg.g_steps,
                meta=cfg.meta,
                reset_l0=cfg.reset_l0,
                warmup_epochs=cfg.warmup_epochs,
            )
        case _:
            assert_never(cfg)
