"""What every synthesizer shares: the :class:`SynthesisContext` (frozen teacher, objective,
memory bank, random generator, image geometry) and the helpers the methods in
:mod:`stars.synthesis.methods` build on.

Every synthesizer takes the STARS plug-in through the shared
:class:`~stars.synthesis.objective.SynthesisObjective`; with the STARS weights 0 each
reproduces its baseline bit for bit. The teacher is frozen; the student is run in eval mode
with its parameters frozen (:func:`~stars.synthesis.objective.frozen`), so synthesis changes
neither its weights nor its BN running statistics. Every random number comes from the
context's own generator (and weights are drawn under :attr:`SynthesisContext.seed`), so
seeded runs repeat exactly and the state can be checkpointed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from stars.models.protocols import SpikingStudent, Teacher
from stars.runtime import autocast
from stars.synthesis.augment import jitter_flip
from stars.synthesis.generators import ConvGenerator
from stars.synthesis.memory import MemoryBank
from stars.synthesis.objective import ObjectiveOutput, SynthesisObjective, frozen
from stars.synthesis.protocols import SynthesisStep

__all__ = [
    "GeneratorState",
    "LowestLoss",
    "PersistentGeneratorSynthesizer",
    "SynthesisContext",
    "SynthesizerBase",
    "maybe_frozen",
    "seeded_generator",
    "step_value",
    "train_generator",
    "with_bank",
    "without_bank",
]


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.ndim == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


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
        channels_last: bool = False,
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
        self.seed = seed
        """Seeds :attr:`rng` and the weights of the methods' generators."""
        self.rng = torch.Generator().manual_seed(seed)
        self._epoch = 0
        self.calls = 0
        self.store = True
        """Add finished batches to the bank (data-parallel runs add every rank's share)."""
        self.channels_last = channels_last
        """Run generators in channels-last memory format (:meth:`generate`)."""

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

    def generate(self, generator: nn.Module, *args: Tensor | None) -> Tensor:
        """``generator(*args)`` under the objective's precision: with ``bf16`` the generator's
        forward (and so its backward) runs under autocast like the teacher's, and its images
        come back as fp32, so the memory bank, the BN statistics and the STARS terms see fp32
        tensors. With ``fp32`` (also a ``fp16`` run's synthesis, which has no grad scaler)
        it is the plain call.

        The generator's convolutions are most of a synthesis step's work (its last two
        convolutions run at 16 and 32 pixels on 128 channels), so this is what makes
        ``precision: bf16`` pay off in synthesis (``benchmarks/README.md``).

        With :attr:`channels_last` every convolution of the generator takes its input in
        channels-last memory format (a forward pre-hook for this call; the layout then
        carries through BN, upsampling and activations), so that oneDNN runs them without
        reordering the activations; the weights, and so every random draw that
        re-initializes them, are left as they are, and the images come back in the usual
        contiguous layout."""
        hooks = []
        if self.channels_last:
            hooks = [
                m.register_forward_pre_hook(_channels_last_input)
                for m in generator.modules()
                if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
            ]
        try:
            with autocast(self.device, self.objective.precision):
                x: Tensor = generator(*args)
        finally:
            for hook in hooks:
                hook.remove()
        return x.float().contiguous() if self.channels_last else x.float()

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
        state |= self.objective.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.rng.set_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.calls = int(state["calls"])
        self.objective.load_state_dict(state)


def step_value(total: Tensor) -> float:
    """The objective's value as a float (the per-step trace, the lowest-loss choice)."""
    return float(total.detach())


class LowestLoss:
    """One call's trace of the objective and its lowest-loss step's images: the batch that
    goes to the bank where a method keeps its best step rather than its last (DeepInversion,
    Fast, NAYER). Ties keep the earlier step."""

    def __init__(self) -> None:
        self.trace: list[float] = []
        self._best: tuple[float, Tensor] | None = None

    def offer(self, total: Tensor, images: Tensor) -> None:
        """Record a step's objective ``total``; keep a copy of ``images`` if it is the
        lowest so far."""
        value = step_value(total)
        self.trace.append(value)
        if self._best is None or value < self._best[0]:
            self._best = (value, images.detach().clone())

    @property
    def images(self) -> Tensor:
        if self._best is None:
            raise RuntimeError("no step was offered")
        return self._best[1]


class SynthesizerBase(ABC):
    """A synthesizer over a :class:`SynthesisContext`: the bank, the objective, the store
    flag, the per-epoch hook and sampling come from the context; a method implements
    :meth:`synthesize` and its checkpoint state."""

    ctx: SynthesisContext

    @abstractmethod
    def synthesize(self, student: SpikingStudent | None) -> SynthesisStep:
        """One synthesis step (see :class:`~stars.synthesis.protocols.Synthesizer`)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, the context's :meth:`SynthesisContext.state_dict`
        under ``"ctx"`` (:func:`without_bank` and :func:`with_bank` rely on it)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

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


def without_bank(state: Mapping[str, Any]) -> dict[str, Any]:
    """A synthesizer's :meth:`~SynthesizerBase.state_dict` without its memory bank (what is
    particular to one data-parallel rank: generators, optimizers, random streams). Every
    synthesizer keeps its context's state under ``"ctx"``, the bank under ``"ctx"/"bank"``;
    this function and :func:`with_bank` are the only readers of that layout outside it."""
    ctx = dict(state["ctx"])
    ctx.pop("bank")
    return {**state, "ctx": ctx}


def with_bank(state: Mapping[str, Any], full: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (from :func:`without_bank`) with the memory bank of ``full`` (a whole
    :meth:`~SynthesizerBase.state_dict`): one rank's own state over the shared bank."""
    return {**state, "ctx": {**state["ctx"], "bank": full["ctx"]["bank"]}}


class GeneratorState:
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


def maybe_frozen(student: SpikingStudent | None) -> Any:
    """:func:`~stars.synthesis.objective.frozen` for a student; nothing for ``None``."""
    return frozen(student) if student is not None else nullcontext()


def seeded_generator(ctx: SynthesisContext, nz: int) -> ConvGenerator:
    """A :class:`ConvGenerator` for the context's geometry, its weights drawn under
    :attr:`SynthesisContext.seed` (the global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        return ConvGenerator(nz, image_size=ctx.image_size, mean=ctx.mean, std=ctx.std)


def train_generator(
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
    with maybe_frozen(student):
        for step in range(g_steps):
            x = ctx.generate(generator, ctx.randn(y.shape[0], generator.nz))
            out = ctx.objective(x, y, student, measure=step == g_steps - 1)
            trace.append(step_value(out.total))
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(out.total)
            opt.step()
            result = (x, out)
    assert result is not None
    return result[0], result[1], trace


class PersistentGeneratorSynthesizer(SynthesizerBase):
    """A generator kept across calls and trained ``g_steps`` times per call; the last batch
    goes to the bank, labelled with the teacher's argmax. Subclasses choose the labels the
    objective's class term sees."""

    def __init__(self, ctx: SynthesisContext, *, nz: int, lr_g: float, g_steps: int) -> None:
        self.ctx = ctx
        self.generator = seeded_generator(ctx, nz).to(ctx.device)
        self.g_steps = g_steps
        self.opt = torch.optim.Adam(self.generator.parameters(), lr=lr_g)
        self._state = GeneratorState(ctx, self.generator, self.opt)

    def _labels(self) -> Tensor:
        raise NotImplementedError

    def synthesize(self, student: SpikingStudent | None) -> SynthesisStep:
        x, out, trace = train_generator(
            self.ctx, self.generator, self.opt, self.g_steps, student, self._labels()
        )
        return self.ctx.finish(x, out.t_logits.argmax(1), out, trace)

    def state_dict(self) -> dict[str, Any]:
        return self._state.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._state.load_state_dict(state)
