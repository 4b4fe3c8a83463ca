"""DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020): pixel optimization with
BN + class CE + TV + L2; its config is :class:`stars.synthesis.methods.DeepInversionSynthesis`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from stars.models.protocols import SpikingStudent
from stars.synthesis.generators import PixelGenerator
from stars.synthesis.objective import ObjectiveOutput
from stars.synthesis.protocols import SynthesisStep
from stars.synthesis.synthesizers import (
    LowestLoss,
    SynthesisContext,
    SynthesizerBase,
    maybe_frozen,
)

__all__ = ["DeepInversionSynthesizer"]


class DeepInversionSynthesizer(SynthesizerBase):
    """DeepInversion: each call optimizes a fresh batch of pixels from N(0, 1).

    Adam on the pixels (betas 0.5/0.9 as in DeepInversion), random jitter and flip every
    iteration, ``L = bn L_bn + oh CE + tv_l1 TV1 + tv_l2 TV2 + l2 ||x|| (+ adv) + STARS``.
    The batch with the lowest objective seen is kept.
    """

    def __init__(
        self,
        ctx: SynthesisContext,
        *,
        iterations: int,
        lr: float,
        jitter: int,
        flip: bool,
    ) -> None:
        self.ctx = ctx
        self.iterations = iterations
        self.lr = lr
        self.jitter = jitter
        self.flip = flip

    def synthesize(self, student: SpikingStudent | None) -> SynthesisStep:
        ctx = self.ctx
        n = ctx.batch_size
        y = ctx.labels(n)
        gen = PixelGenerator(n, ctx.channels, ctx.image_size, generator=ctx.rng).to(ctx.device)
        opt = torch.optim.Adam(gen.parameters(), lr=self.lr, betas=(0.5, 0.9), eps=1e-8)
        best = LowestLoss()
        out: ObjectiveOutput | None = None
        with maybe_frozen(student):
            for step in range(self.iterations):
                x = gen()
                x_aug = ctx.augment(x, max_shift=self.jitter, flip=self.flip)
                out = ctx.objective(x_aug, y, student, measure=step == self.iterations - 1)
                best.offer(out.total, x)
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(out.total)
                opt.step()
        assert out is not None
        return ctx.finish(best.images, y, out, best.trace)

    def state_dict(self) -> dict[str, Any]:
        return {"ctx": self.ctx.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ctx.load_state_dict(state["ctx"])
