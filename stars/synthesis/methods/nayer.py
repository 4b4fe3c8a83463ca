"""NAYER: noisy-layer data generation (Tran et al., CVPR 2024, "NAYER: Noisy Layer Data
Generation for Efficient and Effective Data-free Knowledge Distillation"), with STARS; its
config is :class:`stars.synthesis.methods.NAYERSynthesis`.

**Generator** (:class:`NoisyLayerGenerator`). A class label ``y`` is looked up in a table of
class embeddings ``E [K, D]``, normalized by a BatchNorm1d, and mapped by a *noisy layer*
(``Linear(D, noise_dim)``) into the input of a DCGAN-style body (``Linear(noise_dim,
2 ngf (s/4)^2)`` -> two (upsample, conv3x3, BN, LeakyReLU) stages -> conv3x3 -> sigmoid ->
the teacher's normalization). There is no latent ``z``: the randomness is the noisy layer,
whose weights are redrawn from N(0, 1) (bias 0) at every synthesis call, while the body
(the BatchNorm1d, the projection and the convolutions) is kept across calls. A batch is laid
out in chunks of ``K`` consecutive samples and every chunk has its own noisy layer
(``ceil(batch_size / K)`` of them), so one class gets a different noise in each chunk.

**Synthesis call** (:class:`NAYERSynthesizer`). Redraw the noisy layers; draw the labels
(``balanced``: NAYER's ``floor(n/K)`` copies of every class plus ``n mod K`` drawn
uniformly; ``uniform``: the shared sorted draw :meth:`SynthesisContext.labels`, which
``stars synthesize`` replaces by the labels its class quotas need), laid out so that each
chunk of ``K`` holds distinct classes where the draw allows; then ``g_steps`` Adam steps
(lr ``lr_g``, betas 0.5/0.999, a fresh optimizer every call as in the reference) on the
whole generator (noisy layers and body) for

``L_G = bn L_bn(momentum statistics) + oh CE(f_T(aug(x)), y) + adv L_adv + STARS``

(:class:`~stars.synthesis.objective.SynthesisObjective`: DeepInversion's BN matching against
statistics blended with momentum ``bn_momentum`` across batches, the plain cross-entropy on
the sampled labels, the adversarial masked KL; the student's terms only from epoch
``warmup_epochs`` on, NAYER's warm-up, during which the run makes no KD step). The batch
with the lowest ``L_G`` seen is kept (un-augmented) and stored; the BN momentum statistics
are then updated from the last step, as the reference's hooks do. At the start of some
epochs (every ``g_life`` epochs, below) the body is re-initialized, the reference's
``reinit``. Every random number (noise weights, labels, augmentation, the re-initialization's
seed) comes from the context's generator, so seeded runs repeat exactly, and a checkpoint
(:meth:`NAYERSynthesizer.state_dict`: the context, the generator with its embeddings, the
epoch of the last re-initialization) resumes identically. The optimizer is made afresh
every call, so it holds no state between calls.

**Deviations from the paper / reference** (tmtuan1307/NAYER):

- *Text encoder.* NAYER embeds each class name ("a image of <class>") with CLIP ViT-B/32's
  text encoder (``D = 512``). No text encoder is available offline, so the embeddings are a
  substitute (``embedding``): ``random``, fixed rows ``E ~ N(0, 1)^{K x D}`` drawn when the
  synthesizer is built, first from the global generator seeded with the run's seed
  (deterministic per seed; unlike CLIP's they carry no semantic similarity between classes:
  distinct rows are nearly orthogonal), or ``learned``, the same initial rows as a parameter
  trained with the generator (kept across calls and across the ``g_life``
  re-initializations). The BatchNorm1d after the lookup makes the table's overall scale
  irrelevant in either case.
- *Spiking student.* The student is an SNN; its time-averaged logits feed the adversarial
  term (and STARS) through the shared objective.
- *Batches per epoch.* The reference makes ``gwp_loops`` batches per warm-up epoch and
  ``g_loops`` after; here every epoch makes ``distill.synthesis_steps_per_epoch`` batches.
- *When the body is re-initialized.* The reference re-initializes at epochs ``e`` with
  ``e % g_life == 0`` or ``(e - warmup) % g_life == 0``; here ``e % g_life == 0`` during the
  warm-up and ``(e - warmup_epochs) % g_life == 0`` after (once per epoch, not at epoch 0).
  The two agree whenever ``g_life`` divides ``warmup_epochs`` (every published NAYER
  setting: warm-up 20, ``g_life`` 10); otherwise the reference's rule re-initializes twice
  within ``warmup mod g_life`` epochs. The reference builds a new generator with PyTorch's
  default initialization; here the body's modules are reset in place with it, under a seed
  drawn from the context's generator.
- *Augmentation.* The shared jitter (a shift of up to ``jitter`` pixels with zero fill in
  the normalized space, one offset per batch) and flip stand in for kornia's
  RandomCrop(pad 4) + flip on [0, 1] images.
- *Label smoothing.* The reference's label-smoothing helpers are unused (``cr = 0``): the
  class term is the plain cross-entropy, as here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from stars.models.protocols import SpikingStudent
from stars.synthesis.generators import Normalize, conv_body
from stars.synthesis.objective import ObjectiveOutput
from stars.synthesis.protocols import SynthesisStep
from stars.synthesis.synthesizers import (
    LowestLoss,
    SynthesisContext,
    SynthesizerBase,
    maybe_frozen,
)

__all__ = [
    "NAYERSynthesizer",
    "NoisyLayerGenerator",
    "chunk_layout",
    "class_embeddings",
    "renew_due",
    "seeded_noisy_generator",
]

Embedding = Literal["random", "learned"]
Labels = Literal["balanced", "uniform"]


def class_embeddings(
    num_classes: int, dim: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """The text-encoder substitute: ``[num_classes, dim]`` rows drawn from N(0, 1) with
    ``generator`` (None: the global one); the same rows for the same generator state."""
    return torch.randn(num_classes, dim, generator=generator)


def chunk_layout(y: Tensor, num_classes: int) -> Tensor:
    """The labels ``y [N]`` reordered so that each chunk of ``num_classes`` consecutive
    samples holds distinct classes where the multiset allows: the ``r``-th occurrence of
    every class goes to chunk ``r`` (classes ascending within a chunk). A permutation of
    ``y``; exactly balanced labels give ``[0..K-1, 0..K-1, ..., rest]`` as NAYER lays them out.
    """
    ys = y.sort().values
    first = torch.searchsorted(ys, ys)
    rank = torch.arange(ys.shape[0], device=ys.device) - first
    return ys[torch.argsort(rank * num_classes + ys, stable=True)]


class NoisyLayerGenerator(nn.Module):
    """NAYER's generator: class embedding -> BatchNorm1d -> per-chunk noisy layer -> body.

    ``forward(z, y)``: ``y [N]`` class labels (required; ``N <= chunks * K``, sample ``i``
    goes through noisy layer ``i // K``), ``z`` is ignored (NAYER has no latent; its noise is
    the noisy layers' weights). Returns images ``[N, C, s, s]`` in the normalized space.

    Args:
        embedding: the class embeddings ``[K, D]`` (copied).
        learn_embedding: train them with the generator (a parameter) instead of keeping them
            fixed (a buffer); either way they are in the state dict.
        batch_size: the synthesis batch size; sets the number of noisy layers.
        noise_dim: the noisy layer's width (the reference's ``le_emb_size``).
    """

    embedding: Tensor

    def __init__(
        self,
        embedding: Tensor,
        *,
        batch_size: int,
        noise_dim: int = 1000,
        learn_embedding: bool = False,
        image_size: int = 32,
        channels: int = 3,
        ngf: int = 64,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        if embedding.dim() != 2:
            raise ValueError(f"embedding must be [K, D], got shape {tuple(embedding.shape)}")
        self.num_classes, embed_dim = embedding.shape
        self.chunks = math.ceil(batch_size / self.num_classes)
        self.ngf = ngf
        self.init_size = image_size // 4
        table = embedding.detach().clone().float()
        if learn_embedding:
            self.embedding = nn.Parameter(table)
        else:
            self.register_buffer("embedding", table)
        self.embed_norm = nn.BatchNorm1d(embed_dim)
        self.noisy = nn.ModuleList(nn.Linear(embed_dim, noise_dim) for _ in range(self.chunks))
        self.project = nn.Linear(noise_dim, ngf * 2 * self.init_size**2)
        self.blocks = conv_body(ngf, channels)
        self.normalize = Normalize(mean, std)

    def body(self) -> list[nn.Module]:
        """The modules kept across synthesis calls (all but the noisy layers and the
        embedding table)."""
        return [self.embed_norm, self.project, self.blocks]

    @torch.no_grad()
    def reset_noise(self, generator: torch.Generator) -> None:
        """Redraw every noisy layer: weights from N(0, 1) with ``generator``, bias 0 (NAYER's
        ``re_init_le``)."""
        for layer in self.noisy:
            assert isinstance(layer, nn.Linear)
            w = torch.randn(layer.weight.shape, generator=generator)
            layer.weight.copy_(w.to(layer.weight.device))
            layer.bias.zero_()

    def reset_body(self, seed: int) -> None:
        """Re-initialize the body with PyTorch's default initialization under ``seed`` (the
        reference's ``reinit`` every ``g_life`` epochs); the embeddings are kept."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for part in self.body():
                for m in part.modules():
                    reset = getattr(m, "reset_parameters", None)
                    if callable(reset):
                        reset()

    def forward(self, z: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        if y is None:
            raise ValueError("NoisyLayerGenerator needs the labels y")
        n, k = y.shape[0], self.num_classes
        if n > self.chunks * k:
            raise ValueError(f"{n} samples need more than the {self.chunks} noisy layers")
        e = self.embed_norm(self.embedding[y])
        v = torch.cat(
            [layer(e[i * k : (i + 1) * k]) for i, layer in enumerate(self.noisy) if i * k < n]
        )
        h = self.project(v).view(n, self.ngf * 2, self.init_size, self.init_size)
        images: Tensor = self.normalize(self.blocks(h))
        return images


def renew_due(epoch: int, *, born: int, g_life: int | None, warmup_epochs: int) -> bool:
    """Whether a call in ``epoch`` re-initializes the body that was (re-)initialized in epoch
    ``born``: ``epoch % g_life == 0`` during the warm-up, ``(epoch - warmup_epochs) % g_life
    == 0`` after, once per epoch (never in ``born`` itself); never with ``g_life`` None."""
    if not g_life or epoch == born:
        return False
    since = epoch if epoch < warmup_epochs else epoch - warmup_epochs
    return since % g_life == 0


def seeded_noisy_generator(
    ctx: SynthesisContext, *, noise_dim: int, embed_dim: int, learn_embedding: bool
) -> NoisyLayerGenerator:
    """A :class:`NoisyLayerGenerator` for the context's geometry and batch size: the class
    embeddings (:func:`class_embeddings`), then the weights, drawn in that order from the
    global generator seeded with :attr:`SynthesisContext.seed` (the global random state is
    left as it was, :attr:`SynthesisContext.rng` is not drawn from)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        table = class_embeddings(ctx.num_classes, embed_dim)
        return NoisyLayerGenerator(
            table,
            batch_size=ctx.batch_size,
            noise_dim=noise_dim,
            learn_embedding=learn_embedding,
            image_size=ctx.image_size,
            channels=ctx.channels,
            mean=ctx.mean,
            std=ctx.std,
        )


class NAYERSynthesizer(SynthesizerBase):
    """NAYER (module docstring): noisy layers redrawn every call, a body kept across calls,
    ``g_steps`` Adam steps per batch on BN + CE + adversarial + STARS, the lowest-loss batch
    kept. Its config is :class:`stars.synthesis.methods.NAYERSynthesis`.

    Args:
        ctx: the shared context (teacher, objective with its BN momentum, bank, random
            generator, seed).
        lr_g: Adam learning rate of the generator.
        g_steps: generator steps per batch.
        warmup_epochs: epochs without the student's terms.
        g_life: re-initialize the generator's body every this many epochs (None: never).
        noise_dim: the noisy layers' width (the reference's ``le_emb_size``).
        embed_dim: the class embeddings' size (CLIP ViT-B/32's text features: 512).
        embedding: ``random`` (fixed) or ``learned`` class embeddings.
        labels: ``balanced`` (NAYER) or ``uniform`` (the shared draw).
        jitter: the augmentation's largest shift in pixels.
    """

    def __init__(
        self,
        ctx: SynthesisContext,
        *,
        lr_g: float,
        g_steps: int,
        warmup_epochs: int,
        g_life: int | None,
        noise_dim: int = 1000,
        embed_dim: int = 512,
        embedding: Embedding = "random",
        labels: Labels = "balanced",
        jitter: int = 4,
    ) -> None:
        self.ctx = ctx
        self.generator = seeded_noisy_generator(
            ctx, noise_dim=noise_dim, embed_dim=embed_dim, learn_embedding=embedding == "learned"
        ).to(ctx.device)
        self.lr_g = lr_g
        self.g_steps = g_steps
        self.warmup_epochs = warmup_epochs
        self.g_life = g_life
        self.label_mode: Labels = labels
        self.jitter = jitter
        self._born = 0
        """The epoch of the generator's last (re-)initialization."""

    def _labels(self, n: int) -> Tensor:
        ctx = self.ctx
        if self.label_mode == "uniform":
            y = ctx.labels(n)
        else:
            s, v = divmod(n, ctx.num_classes)
            rest = torch.randint(0, ctx.num_classes, (v,), generator=ctx.rng)
            y = torch.cat([torch.arange(ctx.num_classes).repeat(s), rest]).to(ctx.device)
        return chunk_layout(y, ctx.num_classes)

    def synthesize(self, student: SpikingStudent | None) -> SynthesisStep:
        ctx, gen = self.ctx, self.generator
        if renew_due(
            ctx.epoch, born=self._born, g_life=self.g_life, warmup_epochs=self.warmup_epochs
        ):
            gen.reset_body(int(torch.randint(0, 2**31, (1,), generator=ctx.rng)))
            self._born = ctx.epoch
        gen.reset_noise(ctx.rng)
        y = self._labels(ctx.batch_size)
        student_active = ctx.epoch >= self.warmup_epochs
        gen.train()
        opt = torch.optim.Adam(gen.parameters(), lr=self.lr_g, betas=(0.5, 0.999))
        best = LowestLoss()
        out: ObjectiveOutput | None = None
        with maybe_frozen(student):
            for step in range(self.g_steps):
                x = ctx.generate(gen, None, y)
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
                opt.step()
        assert out is not None
        ctx.objective.update_momentum(out.stats)
        return ctx.finish(best.images, y, out, best.trace)

    def state_dict(self) -> dict[str, Any]:
        """The context (bank, random state, BN momentum, epoch), the generator (body, noisy
        layers, embeddings, BN buffers) and the epoch of its last re-initialization. The
        optimizer is made afresh every call (as in the reference), so it holds no state."""
        return {
            "ctx": self.ctx.state_dict(),
            "generator": self.generator.state_dict(),
            "born": self._born,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ctx.load_state_dict(state["ctx"])
        self.generator.load_state_dict(state["generator"])
        self._born = int(state["born"])
