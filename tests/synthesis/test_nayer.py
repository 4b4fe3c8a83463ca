"""NAYER (noisy-layer generation): the label layout, the class-embedding substitute, the noisy
layers redrawn every call while the body is kept, the body's re-initialization every
``g_life`` epochs, label conditioning, seeding, resume and untouched models. The generic
synthesizer tests (tests/synthesis/test_synthesizers.py) run ``nayer`` too."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from error_model import U64
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import Tensor, nn

from stars.config import RunConfig, StarsConfig, load_config
from stars.distill.checkpoint import flatten_state, unflatten_state
from stars.synthesis.export import requested_labels
from stars.synthesis.methods import NAYERSynthesis
from stars.synthesis.methods.nayer import (
    NAYERSynthesizer,
    NoisyLayerGenerator,
    chunk_layout,
    class_embeddings,
    renew_due,
)
from stars.synthesis.protocols import Generator
from synthesis.test_synthesizers import (
    STARS_ON,
    K,
    assert_untouched,
    build,
    snapshot,
    tiny_student,
    tiny_teacher,
)

ROOT = Path(__file__).resolve().parents[2]

# A tiny NAYER: 6 images of 16 px (K = 4 classes: 2 noisy layers), 4 steps per batch,
# narrow embeddings and noisy layers, the student from the first epoch, the body renewed
# every 2 epochs.
TINY = NAYERSynthesis(
    batch_size=6,
    g_steps=4,
    lr_g=0.01,
    memory_size=64,
    warmup_epochs=0,
    g_life=2,
    noise_dim=12,
    embed_dim=8,
)


def make(stars: StarsConfig = StarsConfig(), seed: int = 0, **update: Any) -> NAYERSynthesizer:
    cfg = NAYERSynthesis.model_validate(TINY.model_dump() | update)
    synth = build(cfg, stars, seed, student_vth=1.0)
    assert isinstance(synth, NAYERSynthesizer)
    return synth


def body_state(gen: NoisyLayerGenerator) -> dict[str, Tensor]:
    """The body's parameters and buffers (everything but the noisy layers and the table)."""
    return {
        f"{i}.{k}": v.detach().clone()
        for i, part in enumerate(gen.body())
        for k, v in part.state_dict().items()
    }


def noisy_state(gen: NoisyLayerGenerator) -> list[tuple[Tensor, Tensor]]:
    out = []
    for layer in gen.noisy:
        assert isinstance(layer, nn.Linear)
        out.append((layer.weight.detach().clone(), layer.bias.detach().clone()))
    return out


class FirstForward:
    """Captures the generator's state at the first forward of the next synthesis call
    (after the call's re-initializations, before any optimizer step)."""

    def __init__(self, gen: NoisyLayerGenerator) -> None:
        self.gen = gen
        self.body: dict[str, Tensor] | None = None
        self.noisy: list[tuple[Tensor, Tensor]] = []
        self.table: Tensor | None = None
        self.handle = gen.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any) -> None:
        if self.body is None:
            self.body = body_state(self.gen)
            self.noisy = noisy_state(self.gen)
            self.table = self.gen.embedding.detach().clone()

    def reset(self) -> None:
        self.body, self.noisy, self.table = None, [], None


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- pure parts


def occurrence_rank(y: list[int]) -> list[int]:
    """``rank_i = #{j < i : y_j == y_i}`` (the reference for :func:`chunk_layout`)."""
    seen: dict[int, int] = {}
    ranks = []
    for c in y:
        ranks.append(seen.get(c, 0))
        seen[c] = ranks[-1] + 1
    return ranks


@examples(200)
@given(k=st.integers(1, 12), data=st.data())
def test_chunk_layout_puts_the_rth_occurrence_in_group_r(k: int, data: st.DataObject) -> None:
    """The output is a permutation of the labels whose key ``rank * K + class`` (rank: the
    occurrences of the class before it) strictly increases: rank group after rank group, each
    with distinct classes in ascending order. Those two facts determine the output."""
    y = data.draw(st.lists(st.integers(0, k - 1), min_size=0, max_size=40))
    out = chunk_layout(torch.tensor(y, dtype=torch.long), k).tolist()
    assert sorted(out) == sorted(y)
    keys = [r * k + c for r, c in zip(occurrence_rank(out), out, strict=True)]
    assert all(a < b for a, b in itertools.pairwise(keys))


@examples(100)
@given(k=st.integers(1, 12), copies=st.integers(0, 6), data=st.data())
def test_chunk_layout_of_balanced_labels_is_nayers(
    k: int, copies: int, data: st.DataObject
) -> None:
    """``copies`` of every class plus a remainder (shuffled): the first ``copies`` chunks of
    ``K`` are each ``0..K-1`` (NAYER's ``generate_ys``), the remainder follows."""
    rest = data.draw(st.lists(st.integers(0, k - 1), max_size=k - 1))
    y = torch.tensor(list(range(k)) * copies + rest, dtype=torch.long)
    y = y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(len(rest)))]
    out = chunk_layout(y, k).tolist()
    assert out[: copies * k] == list(range(k)) * copies
    assert sorted(out[copies * k :]) == sorted(rest)


@examples(50)
@given(seed=st.integers(0, 2**31 - 1), other=st.integers(0, 2**31 - 1))
def test_class_embeddings_are_deterministic_per_seed(seed: int, other: int) -> None:
    def draw(s: int) -> Tensor:
        return class_embeddings(K, 8, generator=torch.Generator().manual_seed(s))

    assert torch.equal(draw(seed), draw(seed))
    assert draw(seed).shape == (K, 8)
    if other != seed:
        assert not torch.equal(draw(seed), draw(other))


@examples(100)
@given(life=st.integers(1, 6), multiple=st.integers(0, 4), born=st.integers(0, 3))
def test_renewal_matches_the_reference_when_g_life_divides_the_warmup(
    life: int, multiple: int, born: int
) -> None:
    """The reference renews at ``e % g_life == 0 or (e - warmup) % g_life == 0``; with
    ``g_life | warmup`` (every published setting) the rule here is the same, apart from the
    epoch the body was made in."""
    warm = life * multiple
    for e in range(40):
        ref = e != born and (e % life == 0 or (e - warm) % life == 0)
        assert renew_due(e, born=born, g_life=life, warmup_epochs=warm) == ref


@examples(100)
@given(life=st.integers(1, 6), warm=st.integers(0, 12))
def test_renewal_counts_from_the_end_of_the_warmup(life: int, warm: int) -> None:
    """Never twice closer than ``g_life`` epochs after the warm-up, always at its end (when
    the warm-up is not empty), never without ``g_life``."""
    due = [e for e in range(1, 60) if renew_due(e, born=0, g_life=life, warmup_epochs=warm)]
    after = [e for e in due if e >= warm]
    assert all(b - a == life for a, b in itertools.pairwise(after))
    assert (warm in due) == (warm > 0)
    assert not any(renew_due(e, born=0, g_life=None, warmup_epochs=warm) for e in range(60))


def small_generator(dtype: torch.dtype = torch.float64) -> NoisyLayerGenerator:
    torch.manual_seed(0)
    table = class_embeddings(K, 8)
    gen = NoisyLayerGenerator(table, batch_size=3 * K, noise_dim=12, image_size=8, ngf=4)
    gen.reset_noise(torch.Generator().manual_seed(1))
    return gen.to(dtype).eval()


# Float64 error model: an image pixel is a chain of L = 5 layers of dot products (lengths
# d <= 36 here) and smooth maps; two evaluations of it that differ only in kernel reduction
# order are within 2 B, B = L d u A with the layer gains A <= 1e6 (weights of default
# initialization, N(0, 1) noisy layers, BN in eval mode with unit statistics): 2 * 5 * 36 *
# U64 * 1e6 ~ 4e-8. Different embeddings move a pixel by O(0.1) (measured ~0.05-1), far above.
SAME_TOL = 2 * 5 * 36 * U64 * 1e6


@examples(50)
@given(data=st.data())
def test_labels_condition_the_images(data: st.DataObject) -> None:
    """In eval mode image ``i`` is a function of its label and its chunk only: equal labels
    at a position give the same image, different labels different images; one class in two
    chunks (two noisy layers) gives two different images."""
    gen = small_generator()
    n = data.draw(st.integers(2, 3 * K))
    labels = st.lists(st.integers(0, K - 1), min_size=n, max_size=n)
    y1, y2 = torch.tensor(data.draw(labels)), torch.tensor(data.draw(labels))
    with torch.no_grad():
        a, b = gen(None, y1), gen(None, y2)
    assert a.shape == (n, 3, 8, 8) and a.dtype == torch.float64
    diff = (a - b).abs().flatten(1).amax(1)
    for i in range(n):
        if y1[i] == y2[i]:
            assert diff[i] <= SAME_TOL, (i, float(diff[i]))
        else:
            assert diff[i] > 1e-3, (i, float(diff[i]))
    y = torch.zeros(K + 1, dtype=torch.long)  # class 0 in chunk 0 (sample 0) and 1 (sample K)
    with torch.no_grad():
        x = gen(None, y)
    assert (x[0] - x[K]).abs().max() > 1e-3
    assert (x[0] - x[1]).abs().max() <= SAME_TOL  # same class, same chunk


def test_generator_needs_labels_and_enough_noisy_layers() -> None:
    gen = small_generator()
    protocol: Generator = gen  # the Generator protocol: __call__(z, y=None)
    assert isinstance(protocol, Generator)
    with pytest.raises(ValueError, match="labels"):
        gen(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="noisy layers"):
        gen(None, torch.zeros(3 * K + 1, dtype=torch.long))


# ----------------------------------------------------------------------------- synthesizer


def test_noisy_layers_are_redrawn_every_call_and_the_body_is_kept() -> None:
    """At the first forward of a call, the noisy layers are the next N(0, 1) draws of the
    context's generator (bias 0) and the body is exactly what the previous call left."""
    synth = make(g_life=None)
    gen = synth.generator
    spy = FirstForward(gen)
    for call in range(3):
        rng = torch.Generator()
        rng.set_state(synth.ctx.rng.get_state())
        before_body, before_noisy = body_state(gen), noisy_state(gen)
        spy.reset()
        synth.synthesize(None)
        assert spy.body is not None
        assert same(spy.body, before_body), call
        assert len(spy.noisy) == gen.chunks == 2
        for (w, b), (w_old, _) in zip(spy.noisy, before_noisy, strict=True):
            assert torch.equal(w, torch.randn(w.shape, generator=rng))
            assert torch.equal(b, torch.zeros_like(b))
            assert not torch.equal(w, w_old)
        # ... and the call trains the body (the noisy layers and the body both move)
        assert not same(body_state(gen), before_body)
    spy.handle.remove()


@pytest.mark.parametrize("embedding", ["random", "learned"])
def test_body_is_renewed_every_g_life_epochs_and_the_embeddings_kept(embedding: str) -> None:
    """``g_life`` 2 after a 1-epoch warm-up: renewed at the first call of epochs 1, 3, 5
    (from a seed drawn from the context's generator), kept at epochs 0, 2, 4 and at a second
    call within an epoch; the class embeddings are never reset."""
    synth = make(g_life=2, warmup_epochs=1, embedding=embedding)
    gen = synth.generator
    spy = FirstForward(gen)
    renewed = []
    for epoch in range(6):
        synth.set_epoch(epoch)
        for call in range(2 if epoch == 3 else 1):
            before, table = body_state(gen), gen.embedding.detach().clone()
            spy.reset()
            synth.synthesize(None)
            assert spy.body is not None and spy.table is not None
            assert torch.equal(spy.table, table)
            if not same(spy.body, before):
                renewed.append((epoch, call))
    assert renewed == [(1, 0), (3, 0), (5, 0)]
    spy.handle.remove()


def test_renewal_is_pytorch_default_init_under_a_drawn_seed() -> None:
    synth = make(g_life=1)
    synth.synthesize(None)
    state = synth.ctx.rng.get_state()
    synth.set_epoch(1)
    spy = FirstForward(synth.generator)
    synth.synthesize(None)
    rng = torch.Generator()
    rng.set_state(state)
    fresh = copy.deepcopy(synth.generator)
    fresh.reset_body(int(torch.randint(0, 2**31, (1,), generator=rng)))
    assert spy.body is not None and same(spy.body, body_state(fresh))
    spy.handle.remove()


def test_embeddings_are_the_seeds_first_draw() -> None:
    """The text-encoder substitute: the first ``K x D`` normal draws of the global generator
    seeded with the run's seed (so: the same per seed, different across seeds), the same
    rows whether fixed (a buffer) or learned (a parameter)."""
    torch.manual_seed(5)
    expected = torch.randn(K, TINY.embed_dim)
    fixed, learned = make(seed=5), make(seed=5, embedding="learned")
    assert torch.equal(fixed.generator.embedding, expected)
    assert torch.equal(learned.generator.embedding.detach(), expected)
    assert torch.equal(make(seed=5).generator.embedding, expected)
    assert not torch.equal(make(seed=6).generator.embedding, expected)
    assert "embedding" in dict(fixed.generator.named_buffers())
    assert "embedding" in dict(learned.generator.named_parameters())
    assert not any(n == "embedding" for n, _ in fixed.generator.named_parameters())


def test_learned_embeddings_train_and_fixed_ones_do_not() -> None:
    fixed, learned = make(), make(embedding="learned")
    t_fixed, t_learned = (s.generator.embedding.detach().clone() for s in (fixed, learned))
    fixed.synthesize(None)
    learned.synthesize(None)
    assert torch.equal(fixed.generator.embedding, t_fixed)
    assert not torch.equal(learned.generator.embedding.detach(), t_learned)


def test_balanced_labels_are_nayers_layout() -> None:
    """Batch 6 over K = 4: every class once in the first chunk, then 2 drawn labels."""
    synth = make()
    for _ in range(3):
        y = synth.synthesize(None).labels
        assert y[:K].tolist() == list(range(K))
        assert y[K:].tolist() == sorted(y[K:].tolist())


def test_uniform_labels_take_the_labels_stars_synthesize_asks_for() -> None:
    synth = make(labels="uniform")
    with requested_labels(synth.ctx, [0, 0, 0, 1, 2, 3]):
        y = synth.synthesize(None).labels
    assert y.tolist() == [0, 1, 2, 3, 0, 0]
    balanced = make()
    with requested_labels(balanced.ctx, [0, 0, 0, 0, 0, 0]):
        assert balanced.synthesize(None).labels[:K].tolist() == list(range(K))


@pytest.mark.parametrize(("embedding", "labels"), [("random", "uniform"), ("learned", "balanced")])
def test_seeded_runs_repeat_and_seeds_differ(embedding: str, labels: str) -> None:
    student = tiny_student()
    a = make(STARS_ON, seed=3, embedding=embedding, labels=labels).synthesize(student)
    b = make(STARS_ON, seed=3, embedding=embedding, labels=labels).synthesize(student)
    c = make(STARS_ON, seed=4, embedding=embedding, labels=labels).synthesize(student)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.losses == b.losses and a.trace == b.trace
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("embedding", ["random", "learned"])
def test_checkpoint_resume_continues_identically(embedding: str) -> None:
    """Epochs 0-2 (the body renewed at epoch 2, ``g_life`` 2), a checkpoint in the middle of
    epoch 2 through the safetensors tree, then a second call of epoch 2 (no second renewal)
    and epochs 3 and 4 (renewed again): a synthesizer built with another seed and loaded
    from the checkpoint makes the same batches, generator and bank as the uninterrupted
    one."""
    student = tiny_student()
    ref = make(STARS_ON, embedding=embedding)
    for epoch in range(3):
        ref.set_epoch(epoch)
        ref.synthesize(student)
    tensors, tree = flatten_state(copy.deepcopy(ref.state_dict()))
    resumed = make(STARS_ON, seed=99, embedding=embedding)
    resumed.load_state_dict(unflatten_state(tensors, tree))
    for epoch in (2, 3, 4):
        for synth in (ref, resumed):
            synth.set_epoch(epoch)
        x, y = ref.synthesize(student), resumed.synthesize(student)
        assert torch.equal(x.images, y.images) and x.losses == y.losses
        assert torch.equal(x.labels, y.labels)
    assert same(snapshot(ref.generator), snapshot(resumed.generator))
    assert len(resumed.ctx.bank) == len(ref.ctx.bank)


def test_teacher_student_and_global_rng_untouched() -> None:
    teacher = tiny_teacher()
    student = tiny_student()
    student.train()
    t0, s0 = snapshot(teacher), snapshot(student)
    synth = build(
        NAYERSynthesis.model_validate(TINY.model_dump() | {"embedding": "learned"}),
        STARS_ON,
        teacher=teacher,
        student_vth=1.0,
    )
    global_rng = torch.get_rng_state()
    for epoch in range(3):  # a renewal at epoch 2
        synth.set_epoch(epoch)
        synth.synthesize(student)
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert_untouched(teacher, t0, student, s0)


def test_warmup_keeps_the_student_out() -> None:
    synth = make(warmup_epochs=1)
    student = tiny_student()
    calls: list[int] = []
    handle = student.bn_layers()[0].register_forward_hook(lambda *a: calls.append(1))
    step = synth.synthesize(student)
    assert not calls and "adv" not in step.losses
    synth.set_epoch(1)
    assert "adv" in synth.synthesize(student).losses and calls
    handle.remove()


def test_config_defaults_are_the_reference_cifar10_script() -> None:
    cfg = NAYERSynthesis()
    assert (cfg.g_steps, cfg.lr_g, cfg.batch_size) == (30, 4e-3, 400)
    assert (cfg.bn_weight, cfg.oh_weight, cfg.adv_weight) == (10.0, 0.5, 1.33)
    assert (cfg.bn_momentum, cfg.warmup_epochs, cfg.g_life) == (0.9, 20, 10)
    assert (cfg.noise_dim, cfg.embed_dim) == (1000, 512)
    assert cfg.matching_momentum == 0.9 and cfg.kd_warmup_epochs == 20
    assert cfg.steps_per_batch == 30
    assert cfg.teacher_only_warmup(epochs=80, per_epoch=2) == 40
    w = cfg.term_weights()
    assert (w.bn, w.oh, w.adv) == (10.0, 0.5, 1.33)


def test_paper_table_family_config_validates() -> None:
    cfg = load_config(ROOT / "benchmarks" / "paper_table" / "nayer.yaml")
    fast = load_config(ROOT / "benchmarks" / "paper_table" / "fast.yaml")
    assert isinstance(cfg, RunConfig) and isinstance(cfg.synthesis, NAYERSynthesis)
    # the same teacher, student and KD budget as the Fast family
    assert cfg.teacher == fast.teacher and cfg.student == fast.student
    assert cfg.distill == fast.distill
    # fast.yaml's STARS block plus the setting confirmed on its test split (spike-aware TAR
    # in KD), which fast.yaml's runs set with --set
    assert cfg.stars.rca == fast.stars.rca and cfg.stars.tar == fast.stars.tar
    assert cfg.stars.spike_tar.student_weight == 1.0
