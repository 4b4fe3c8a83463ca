"""Synthesizers behind the :class:`~stars.synthesis.protocols.Synthesizer` protocol.

- :class:`DeepInversionSynthesizer`: pixel optimization with BN + class CE + TV + L2
  (Yin et al., "Dreaming to Distill", CVPR 2020).
- :class:`DAFLSynthesizer`: a generator trained with one-hot (pseudo-label CE), activation
  and information-entropy terms (Chen et al., "Data-Free Learning of Student Networks",
  ICCV 2019).
- :class:`DFADSynthesizer`: an adversarial generator maximizing the teacher-student L1
  discrepancy (Fang et al., "Data-Free Adversarial Distillation", 2019).
- :class:`FastSynthesizer`: a generator meta-learned across batches, a few steps per batch
  from the shared initialization, BN + CE + adversarial masked KL with momentum BN
  statistics (Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022).

All four take the STARS plug-in (RCA and TAR, :class:`~stars.synthesis.objective.
SynthesisObjective`); with both STARS weights 0 each reproduces its baseline bit for bit.
The teacher is frozen; the student is run in eval mode with its parameters frozen
(:func:`~stars.synthesis.objective.frozen`), so synthesis changes neither its weights nor its
BN running statistics. Every random number comes from the synthesizer's own generator, so
seeded runs repeat exactly and the state can be checkpointed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stars.models.protocols import SpikingStudent, Teacher
from stars.synthesis.augment import jitter_flip
from stars.synthesis.generators import ConvGenerator, PixelGenerator
from stars.synthesis.memory import MemoryBank
from stars.synthesis.objective import ObjectiveOutput, SynthesisObjective, frozen
from stars.synthesis.protocols import SynthesisStep

__all__ = [
    "DAFLSynthesizer",
    "DFADSynthesizer",
    "DeepInversionSynthesizer",
    "FastSynthesizer",
    "SynthesisContext",
]


class SynthesisContext:
    """What every synthesizer shares: the frozen teacher, the objective, the memory bank,
    the random generator and the image geometry."""

    def __init__(
        self,
        teacher: Teacher,
        objective: SynthesisObjective,
        *,
        num_classes: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        memory_size: int,
        device: torch.device,
        seed: int,
        channels: int = 3,
    ) -> None:
        self.teacher = teacher
        self.objective = objective.to(device)
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = batch_size
        self.device = device
        self.bank = MemoryBank(memory_size, mean, std)
        self.rng = torch.Generator().manual_seed(seed)
        self._epoch = 0
        self.calls = 0
        self.store = True
        """Add finished batches to the bank (data-parallel runs add every rank's share)."""

    @property
    def epoch(self) -> int:
        """The 0-based epoch; setting it applies ``stars.schedule`` to the objective."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = int(value)
        self.objective.set_epoch(self._epoch)

    def labels(self, n: int) -> Tensor:
        """``n`` uniformly drawn class labels, sorted (as Fast/CMI do), on the device."""
        y = torch.randint(0, self.num_classes, (n,), generator=self.rng).sort().values
        return y.to(self.device)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.rng).to(self.device)

    def augment(self, x: Tensor, *, max_shift: int, flip: bool = True) -> Tensor:
        return jitter_flip(x, max_shift=max_shift, flip=flip, generator=self.rng)

    def finish(
        self,
        images: Tensor,
        labels: Tensor,
        out: ObjectiveOutput,
        trace: Sequence[float] = (),
    ) -> SynthesisStep:
        """Store the batch in the bank (unless it is not finite) and package the result."""
        images = images.detach()
        losses = {k: float(v.detach()) for k, v in out.terms.items()}
        losses["total"] = float(out.total.detach())
        finite = bool(torch.isfinite(images).all()) and math.isfinite(losses["total"])
        if finite and self.store:
            self.bank.add(images, labels)
        self.calls += 1
        return SynthesisStep(
            images=images,
            labels=labels.detach(),
            losses=losses,
            trace=tuple(trace),
            finite=finite,
        )

    def sample(self, n: int) -> Tensor:
        return self.bank.sample(n, generator=self.rng)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "bank": self.bank.state_dict(),
            "rng": self.rng.get_state(),
            "epoch": self.epoch,
            "calls": self.calls,
        }
        if self.objective.momentum_state is not None:
            state["bn_momentum"] = [(m.cpu(), v.cpu()) for m, v in self.objective.momentum_state]
        if self.objective.rca_calibrated:
            state["rca_weight"] = self.objective.rca_weight
            state["rca_age"] = self.objective.rca_age
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.rng.set_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.calls = int(state["calls"])
        mmt = state.get("bn_momentum")
        self.objective.momentum_state = (
            None if mmt is None else [(m.to(self.device), v.to(self.device)) for m, v in mmt]
        )
        if "rca_weight" in state:
            self.objective.rca_weight = float(state["rca_weight"])
            self.objective.rca_calibrated = True
            self.objective.rca_age = int(state.get("rca_age", 0))


def _step_value(total: Tensor) -> float:
    return float(total.detach())


class _OnContext:
    """What the :class:`~stars.synthesis.protocols.Synthesizer` protocol reads from the
    shared :class:`SynthesisContext`: the bank, the objective, the store flag, the per-epoch
    hook and sampling."""

    ctx: SynthesisContext

    @property
    def bank(self) -> MemoryBank:
        return self.ctx.bank

    @property
    def objective(self) -> SynthesisObjective:
        return self.ctx.objective

    @property
    def store(self) -> bool:
        return self.ctx.store

    @store.setter
    def store(self, value: bool) -> None:
        self.ctx.store = value

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch (``stars.schedule``; Fast's warm-up and first-layer reset)."""
        self.ctx.epoch = epoch

    def sample(self, n: int) -> Tensor:
        return self.ctx.sample(n)


class DeepInversionSynthesizer(_OnContext):
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
        best: tuple[float, Tensor] | None = None
        out: ObjectiveOutput | None = None
        trace: list[float] = []
        with _maybe_frozen(student):
            for _ in range(self.iterations):
                x = gen()
                x_aug = ctx.augment(x, max_shift=self.jitter, flip=self.flip)
                out = ctx.objective(x_aug, y, student)
                value = _step_value(out.total)
                trace.append(value)
                if best is None or value < best[0]:
                    best = (value, x.detach().clone())
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(out.total)
                opt.step()
        assert best is not None and out is not None
        return ctx.finish(best[1], y, out, trace)

    def state_dict(self) -> dict[str, Any]:
        return {"ctx": self.ctx.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ctx.load_state_dict(state["ctx"])


class _GeneratorState:
    """Checkpoint state of the generator-based methods (held by composition): the context,
    a persistent :class:`ConvGenerator` and its optimizer."""

    def __init__(
        self, ctx: SynthesisContext, generator: ConvGenerator, opt: torch.optim.Optimizer
    ) -> None:
        self.ctx = ctx
        self.generator = generator
        self.opt = opt

    def state_dict(self) -> dict[str, Any]:
        return {
            "ctx": self.ctx.state_dict(),
            "generator": self.generator.state_dict(),
            "opt": self.opt.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ctx.load_state_dict(state["ctx"])
        self.generator.load_state_dict(state["generator"])
        self.opt.load_state_dict(state["opt"])


def _maybe_frozen(student: SpikingStudent | None) -> Any:
    from contextlib import nullcontext

    return frozen(student) if student is not None else nullcontext()


def _train_generator(
    ctx: SynthesisContext,
    generator: ConvGenerator,
    opt: torch.optim.Optimizer,
    g_steps: int,
    student: SpikingStudent | None,
    y: Tensor,
) -> tuple[Tensor, ObjectiveOutput, list[float]]:
    """``g_steps`` updates of a persistent generator on fresh latents; the last batch."""
    generator.train()
    result: tuple[Tensor, ObjectiveOutput] | None = None
    trace: list[float] = []
    with _maybe_frozen(student):
        for _ in range(g_steps):
            x = generator(ctx.randn(y.shape[0], generator.nz))
            out = ctx.objective(x, y, student)
            trace.append(_step_value(out.total))
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(out.total)
            opt.step()
            result = (x, out)
    assert result is not None
    return result[0], result[1], trace


class _PersistentGeneratorSynthesizer(_OnContext):
    """A generator kept across calls and trained ``g_steps`` times per call; the last batch
    goes to the bank, labelled with the teacher's argmax. Subclasses choose the labels the
    objective's class term sees."""

    def __init__(
        self, ctx: SynthesisContext, generator: ConvGenerator, *, lr_g: float, g_steps: int
    ) -> None:
        self.ctx = ctx
        self.generator = generator.to(ctx.device)
        self.g_steps = g_steps
        self.opt = torch.optim.Adam(self.generator.parameters(), lr=lr_g)
        self._state = _GeneratorState(ctx, self.generator, self.opt)

    def _labels(self) -> Tensor:
        raise NotImplementedError

    def synthesize(self, student: SpikingStudent | None) -> SynthesisStep:
        x, out, trace = _train_generator(
            self.ctx, self.generator, self.opt, self.g_steps, student, self._labels()
        )
        return self.ctx.finish(x, out.t_logits.argmax(1), out, trace)

    def state_dict(self) -> dict[str, Any]:
        return self._state.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._state.load_state_dict(state)


class DAFLSynthesizer(_PersistentGeneratorSynthesizer):
    """DAFL: a persistent generator trained ``g_steps`` times per call on
    ``oh CE(t, argmax t) + act (-|f|) + ie (-H(mean p)) (+ bn) + STARS``; the last batch
    goes to the bank, labelled with the teacher's argmax."""

    def _labels(self) -> Tensor:
        # The class term uses the teacher's own argmax (TermWeights.pseudo_labels): these
        # labels only keep the objective's signature.
        return torch.zeros(self.ctx.batch_size, dtype=torch.long, device=self.ctx.device)


class DFADSynthesizer(_PersistentGeneratorSynthesizer):
    """DFAD: a persistent generator trained ``g_steps`` times per call to maximize
    ``mean |t - s|`` (``-dfad`` is minimized) (+ bn + oh on sampled labels) + STARS."""

    def _labels(self) -> Tensor:
        return self.ctx.labels(self.ctx.batch_size)


class FastSynthesizer(_OnContext):
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
        generator: ConvGenerator,
        *,
        lr_g: float,
        lr_z: float,
        g_steps: int,
        meta: bool,
        reset_l0: bool,
        warmup_epochs: int,
        jitter: int = 4,
    ) -> None:
        self.ctx = ctx
        self.generator = generator.to(ctx.device)
        self.lr_g, self.lr_z = lr_g, lr_z
        self.g_steps = g_steps
        self.meta = meta
        self.reset_l0 = reset_l0
        self.warmup_epochs = warmup_epochs
        self.jitter = jitter
        self.meta_opt = torch.optim.Adam(
            self.generator.parameters(), lr=lr_g * g_steps, betas=(0.5, 0.999)
        )
        self._state = _GeneratorState(ctx, self.generator, self.meta_opt)
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
        best: tuple[float, Tensor] | None = None
        out: ObjectiveOutput | None = None
        trace: list[float] = []
        if self.meta:
            self.meta_opt.zero_grad(set_to_none=True)
        with _maybe_frozen(student):
            for _ in range(self.g_steps):
                x = fast(z)
                x_aug = ctx.augment(x, max_shift=self.jitter)
                out = ctx.objective(x_aug, y, student, student_active=student_active)
                value = _step_value(out.total)
                trace.append(value)
                if best is None or value < best[0]:
                    best = (value, x.detach().clone())
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(out.total)
                if self.meta:
                    _accumulate_grads(self.generator, fast)
                opt.step()
        assert best is not None and out is not None
        ctx.objective.update_momentum(out.stats)
        if self.meta:
            self.meta_opt.step()
        else:
            self.meta_opt.zero_grad(set_to_none=True)
            _reptile_grads(self.generator, fast)
            self.meta_opt.step()
        return ctx.finish(best[1], y, out, trace)

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
