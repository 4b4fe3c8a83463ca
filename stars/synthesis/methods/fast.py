"""Fast (Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022): a
generator meta-learned across batches, a few steps per batch from the shared initialization,
BN + CE + adversarial masked KL with momentum BN statistics; its config is
:class:`stars.synthesis.methods.FastSynthesis`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from stars.models.protocols import SpikingStudent
from stars.synthesis.objective import ObjectiveOutput
from stars.synthesis.protocols import SynthesisStep
from stars.synthesis.synthesizers import (
    GeneratorState,
    LowestLoss,
    SynthesisContext,
    SynthesizerBase,
    maybe_frozen,
    seeded_generator,
)

__all__ = ["FastSynthesizer"]


class FastSynthesizer(SynthesizerBase):
    """Fast (Fang et al., AAAI 2022): meta-learned generator, ``g_steps`` per batch.

    Each call clones the shared generator, optimizes the clone and a fresh latent ``z``
    (Adam, lr ``lr_g`` / ``lr_z``, betas 0.5/0.999) for ``g_steps`` on
    ``bn L_bn(momentum stats) + oh CE + adv L_adv + STARS``, keeps the lowest-loss batch,
    then updates the shared generator: first-order MAML (the clone's gradients summed over
    the steps, ``meta: true``) or Reptile (towards the clone's weights). The adversarial
    terms stay off during the warm-up epochs; the first layer is re-initialized once,
    120 epochs after warm-up (``reset_l0``), as in Fast.
    """

    def __init__(
        self,
        ctx: SynthesisContext,
        *,
        nz: int,
        lr_g: float,
        lr_z: float,
        g_steps: int,
        meta: bool,
        reset_l0: bool,
        warmup_epochs: int,
        jitter: int = 4,
    ) -> None:
        self.ctx = ctx
        self.generator = seeded_generator(ctx, nz).to(ctx.device)
        self.lr_g, self.lr_z = lr_g, lr_z
        self.g_steps = g_steps
        self.meta = meta
        self.reset_l0 = reset_l0
        self.warmup_epochs = warmup_epochs
        self.jitter = jitter
        self.meta_opt = torch.optim.Adam(
            self.generator.parameters(), lr=lr_g * g_steps, betas=(0.5, 0.999)
        )
        self._state = GeneratorState(ctx, self.generator, self.meta_opt)
        self._reset_done = False

    def synthesize(self, student: SpikingStudent | None) -> SynthesisStep:
        ctx = self.ctx
        n = ctx.batch_size
        if self.reset_l0 and not self._reset_done and ctx.epoch >= 120 + self.warmup_epochs:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=ctx.rng)))
                self.generator.first_layer().reset_parameters()
            self._reset_done = True
        student_active = ctx.epoch >= self.warmup_epochs
        z = ctx.randn(n, self.generator.nz).requires_grad_(True)
        y = ctx.labels(n)
        fast = copy.deepcopy(self.generator)
        fast.train()
        groups: list[dict[str, Any]] = [
            {"params": list(fast.parameters())},
            {"params": [z], "lr": self.lr_z},
        ]
        opt = torch.optim.Adam(
            groups,
            lr=self.lr_g,
            betas=(0.5, 0.999),
        )
        best = LowestLoss()
        out: ObjectiveOutput | None = None
        if self.meta:
            self.meta_opt.zero_grad(set_to_none=True)
        with maybe_frozen(student):
            for step in range(self.g_steps):
                x = ctx.generate(fast, z)
                x_aug = ctx.augment(x, max_shift=self.jitter)
                out = ctx.objective(
                    x_aug,
                    y,
                    student,
                    student_active=student_active,
                    measure=step == self.g_steps - 1,
                )
                best.offer(out.total, x)
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(out.total)
                if self.meta:
                    _accumulate_grads(self.generator, fast)
                opt.step()
        assert out is not None
        ctx.objective.update_momentum(out.stats)
        if self.meta:
            self.meta_opt.step()
        else:
            self.meta_opt.zero_grad(set_to_none=True)
            _reptile_grads(self.generator, fast)
            self.meta_opt.step()
        return ctx.finish(best.images, y, out, best.trace)

    def state_dict(self) -> dict[str, Any]:
        state = self._state.state_dict()
        state["reset_done"] = self._reset_done
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._state.load_state_dict(state)
        self._reset_done = bool(state.get("reset_done", False))


def _accumulate_grads(meta: nn.Module, fast: nn.Module) -> None:
    """First-order MAML: add the fast weights' gradients to the meta weights' gradients."""
    for p, q in zip(meta.parameters(), fast.parameters(), strict=True):
        if q.grad is None:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(q.grad.detach())


def _reptile_grads(meta: nn.Module, fast: nn.Module) -> None:
    """Reptile: the meta gradient is ``meta - fast`` (a step towards the adapted weights)."""
    for p, q in zip(meta.parameters(), fast.parameters(), strict=True):
        p.grad = (p.detach() - q.detach()).clone()
