"""CMI (Contrastive Model Inversion): the contrastive term, the views, the feature bank and the
synthesizer's own guarantees (fresh generator per call, seeding, resume, untouched models).
The generic synthesizer tests (tests/synthesis/test_synthesizers.py) run ``cmi`` too."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from error_model import U32, U64
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import Tensor, nn

from stars.config import StarsConfig
from stars.distill.checkpoint import flatten_state, unflatten_state
from stars.synthesis.methods import CMISynthesis
from stars.synthesis.methods.cmi import (
    CMISynthesizer,
    FeatureBank,
    _reinit_generator,
    cmi_contrastive_loss,
    contrastive_rows,
    global_view,
    local_view,
    sample_resized_crops,
)
from stars.synthesis.protocols import Synthesizer
from synthesis.test_synthesizers import (
    SIZE,
    STARS_OFF_OTHER,
    STARS_ON,
    assert_untouched,
    build,
    snapshot,
    tiny_student,
    tiny_teacher,
)

TAU = st.floats(0.05, 2.0)

# A tiny CMI: 6 images of 16 px, 4 steps per batch, a small head and bank (the bank fills up
# and wraps after 3 calls), every term on.
TINY = CMISynthesis(
    batch_size=6,
    nz=16,
    iterations=4,
    lr_g=0.01,
    memory_size=64,
    head_dim=8,
    feature_bank_size=15,
    n_negatives=8,
)


def make(
    stars: StarsConfig = StarsConfig(), seed: int = 0, cfg: CMISynthesis = TINY
) -> CMISynthesizer:
    synth = build(cfg, stars, seed, student_vth=1.0)
    assert isinstance(synth, CMISynthesizer)
    return synth


def unit_rows(r: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(r, d, generator=g, dtype=dtype), dim=1)


def row_error(r: int, d: int, tau: float, u: float = U32) -> float:
    """Rounding bound on one InfoNCE row of unit rows (tests/error_model.py): each logit
    ``a . k / tau`` is a dot product of unit rows (``d u``, magnitude <= 1) and a division
    (``u``), so off by ``(d + 1) u / tau`` (plus the rows' own unit-norm error, ``(d + 2) u``
    each: ``(3 d + 5) u / tau`` in all); ``logsumexp - logit`` rounds once per term of the
    max-shifted exp-sum and in the log, ``4 eps (z_max + log r + 1)`` with ``z_max = 2 / tau``
    (as ``kl_error``), ``eps = 2 u``."""
    return 2 * (3 * d + 5) * u / tau + 8 * u * (2 / tau + math.log(r) + 1)


# ----------------------------------------------------------------------------- the loss


@examples(60)
@given(r=st.integers(1, 12), d=st.integers(1, 8), tau=TAU, seed=st.integers(0, 2**16))
def test_info_nce_rows_are_bounded(r: int, d: int, tau: float, seed: int) -> None:
    """``0 <= l_i <= log(1 + (r - 1) e^(2 / tau)) <= log r + 2 / tau`` for unit rows (each of
    the ``r - 1`` negatives' logit exceeds the positive's by at most ``2 / tau``)."""
    a, k = unit_rows(r, d, seed), unit_rows(r, d, seed + 1)
    rows = contrastive_rows(a, k, temperature=tau)
    tol = row_error(r, d, tau)
    upper = math.log1p((r - 1) * math.exp(2 / tau))
    assert upper <= math.log(r) + 2 / tau + 1e-12
    assert bool((rows >= -tol).all()) and bool((rows <= upper + tol).all()), (rows, upper)
    # L_cr, a mean over the current rows plus one over the cached rows: <= 2 upper.
    n = max(1, r // 2)
    loss = float(cmi_contrastive_loss(a, k, temperature=tau, n_current=n))
    assert -2 * tol <= loss <= (2 if n < r else 1) * (upper + tol)


@examples(40)
@given(r=st.integers(1, 10), d=st.integers(1, 8), tau=TAU, seed=st.integers(0, 2**16))
def test_info_nce_agrees_with_a_float64_reference(r: int, d: int, tau: float, seed: int) -> None:
    """The rows against ``-log(exp(a_i k_i / tau) / sum_j exp(a_i k_j / tau))`` computed
    naively in float64 (exact enough: ``|logit| <= 1 / tau <= 20``, no overflow); tolerance:
    the float32 row bound plus the float64 reference's own (negligible) bound."""
    a64, k64 = unit_rows(r, d, seed, torch.float64), unit_rows(r, d, seed + 1, torch.float64)
    logits = a64 @ k64.T / tau
    ref = -torch.log(torch.exp(logits.diagonal()) / torch.exp(logits).sum(1))
    got = contrastive_rows(a64.float(), k64.float(), temperature=tau).double()
    tol = row_error(r, d, tau) + row_error(r, d, tau, U64) + 4 * (d + 2) * U32 / tau
    assert torch.allclose(got, ref, rtol=0, atol=tol), (got - ref).abs().max()


@examples(20)
@given(r=st.integers(1, 12), tau=TAU)
def test_info_nce_of_identical_rows_is_log_r(r: int, tau: float) -> None:
    """Every logit equal (one direction for all rows): each row is ``log r`` (chance)."""
    a = unit_rows(1, 5, 0).expand(r, 5)
    rows = contrastive_rows(a, a, temperature=tau)
    assert torch.allclose(rows, torch.full((r,), math.log(r)), rtol=0, atol=row_error(r, 5, tau))


@examples(40)
@given(
    n=st.integers(1, 8),
    m=st.integers(0, 8),
    d=st.integers(1, 8),
    tau=TAU,
    seed=st.integers(0, 2**16),
)
def test_contrastive_loss_is_invariant_to_a_shared_permutation(
    n: int, m: int, d: int, tau: float, seed: int
) -> None:
    """Permuting the current rows among themselves and the cached rows among themselves, the
    same way in anchors and keys, permutes the logits' rows and columns together: each row
    sees the same values in another order, so only rounding changes (each of the two means:
    its rows' bound twice, for two summation orders, plus the mean's own ``m u a``)."""
    r = n + m
    a, k = unit_rows(r, d, seed), unit_rows(r, d, seed + 1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.cat([torch.randperm(n, generator=g), n + torch.randperm(m, generator=g)])
    base = float(cmi_contrastive_loss(a, k, temperature=tau, n_current=n))
    permuted = float(cmi_contrastive_loss(a[perm], k[perm], temperature=tau, n_current=n))
    upper = math.log(r) + 2 / tau
    tol = 2 * (2 * row_error(r, d, tau) + r * U32 * upper)
    assert abs(base - permuted) <= tol


def test_contrastive_loss_rejects_bad_shapes() -> None:
    a = unit_rows(4, 3, 0)
    with pytest.raises(ValueError, match="anchors"):
        contrastive_rows(a, a[:3], temperature=0.1)
    with pytest.raises(ValueError, match="n_current"):
        cmi_contrastive_loss(a, a, temperature=0.1, n_current=0)
    with pytest.raises(ValueError, match="n_current"):
        cmi_contrastive_loss(a, a, temperature=0.1, n_current=5)


def test_contrastive_gradient_reaches_images_and_head_not_keys() -> None:
    """``L_cr`` reaches the images (through the local view and the teacher) and the head; the
    keys (global features) are a stop-gradient target, as in CMI."""
    synth = make()
    synth.synthesize(None)  # the feature bank holds one batch: cached rows take part
    assert len(synth.features) == 6
    x = (torch.randn(6, 3, SIZE, SIZE) * 0.5).requires_grad_(True)
    g_feat = torch.randn(6, synth.feature_dim, requires_grad=True)
    for p in synth.head.parameters():
        p.grad = None
    loss, l_feat = synth._contrastive(x, g_feat)
    assert l_feat.shape == (6, synth.feature_dim)
    torch.autograd.backward(loss)
    assert x.grad is not None and float(x.grad.norm()) > 0
    assert all(p.grad is not None and float(p.grad.norm()) > 0 for p in synth.head.parameters())
    assert g_feat.grad is None
    assert all(p.grad is None for p in synth.ctx.teacher.parameters())


# ----------------------------------------------------------------------------- the views


@examples(40)
@given(n=st.integers(1, 16), h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 99))
def test_resized_crops_fit_the_image_and_draw_a_fixed_count(
    n: int, h: int, w: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes = sample_resized_crops(n, h, w, scale=(0.25, 1.0), ratio=(0.75, 4 / 3), generator=g)
    top, left, bh, bw = boxes.unbind(1)
    assert boxes.shape == (n, 4)
    assert bool((bh >= 1).all() and (bw >= 1).all())
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + bh <= h).all() and (left + bw <= w).all())
    # 2 n tries + 2 n numbers (float64), whatever the boxes: the stream does not depend on them
    ref = torch.Generator().manual_seed(seed)
    torch.rand(2 * n * 10 + 2 * n, generator=ref, dtype=torch.float64)
    assert torch.equal(g.get_state(), ref.get_state())


def test_resized_crop_areas_follow_the_scale_range() -> None:
    """On a 32 px image (area ``A = 1024``) a box drawn at area share ``s >= 0.25`` and
    aspect ``a`` has sides rounded from ``sqrt(s A a)`` and ``sqrt(s A / a)``, each by at
    most 1/2, so its area is ``>= s A - (sqrt(s A a) + sqrt(s A / a)) / 2 + 1/4``; over
    ``a`` in ``[3/4, 4/3]`` ``sqrt(a) + 1 / sqrt(a) <= sqrt(4/3) + sqrt(3/4)``. The shares
    also spread over the range."""
    g = torch.Generator().manual_seed(0)
    boxes = sample_resized_crops(2000, 32, 32, scale=(0.25, 1.0), ratio=(0.75, 4 / 3), generator=g)
    share = (boxes[:, 2] * boxes[:, 3]).double() / 32**2
    spread = math.sqrt(4 / 3) + math.sqrt(3 / 4)
    lowest = 0.25 - math.sqrt(0.25) * spread / (2 * 32) + 0.25 / 32**2
    assert float(share.min()) >= lowest
    assert float(share.max()) <= 1.0
    assert float(share.quantile(0.1)) < 0.4 and float(share.quantile(0.9)) > 0.8


@examples(20)
@given(value=st.floats(-3, 3), seed=st.integers(0, 99))
def test_local_view_of_a_flat_image_is_flat(value: float, seed: int) -> None:
    """Bilinear resampling weights sum to 1: a constant image stays that constant (each
    output is a 4-term convex combination: ``4 u |v|`` plus the weights' own rounding,
    ``4 u |v|``)."""
    x = torch.full((5, 3, SIZE, SIZE), value)
    out = local_view(x, generator=torch.Generator().manual_seed(seed))
    assert out.shape == x.shape
    assert torch.allclose(out, x, rtol=0, atol=8 * U32 * abs(value) + 1e-30)


def test_global_view_copies_pixels_or_black_and_flows_gradients() -> None:
    """Every pixel of the global view is one of the image's (same channel) or the padding
    value; the view of a sample is its image shifted by at most 4 pixels (and maybe
    flipped), so it keeps at least (16 - 4)^2 of its pixels."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, SIZE, SIZE, requires_grad=True)
    black = torch.tensor([-2.0, -3.0, -4.0])
    out = global_view(x, black=black, generator=g)
    assert out.shape == x.shape
    for i in range(8):
        for c in range(3):
            values = set(x[i, c].detach().flatten().tolist()) | {float(black[c])}
            seen = out[i, c].detach().flatten().tolist()
            assert set(seen) <= values
            assert sum(v != float(black[c]) for v in seen) >= (SIZE - 4) ** 2
    torch.autograd.backward(out.sum())
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- the bank


def test_feature_bank_is_a_ring_and_samples_without_replacement() -> None:
    bank = FeatureBank(5, 2, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    assert len(bank) == 0 and bank.sample(3, generator=g).shape == (0, 2)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    rows = torch.arange(16.0).view(8, 2)
    bank.add(rows[:3])
    bank.add(rows[3:7])  # wraps: rows 2..6 remain
    assert len(bank) == 5
    assert torch.equal(bank.rows(), rows[2:7])
    drawn = bank.sample(4, generator=g)
    assert len({tuple(r) for r in drawn.tolist()}) == 4
    assert {tuple(r) for r in drawn.tolist()} <= {tuple(r) for r in rows[2:7].tolist()}
    fresh = FeatureBank(5, 2, torch.device("cpu"))
    fresh.load_state_dict(bank.state_dict())
    bank.add(rows[7:])
    fresh.add(rows[7:])
    assert torch.equal(fresh.rows(), bank.rows())
    assert torch.equal(bank.rows(), rows[3:8])
    with pytest.raises(ValueError, match="expected"):
        bank.add(torch.zeros(2, 3))


# ----------------------------------------------------------------------------- the method


def _initial_weights(synth: CMISynthesizer) -> list[dict[str, Tensor]]:
    """Record the generator's weights at the first forward of each later call."""
    seen: list[dict[str, Tensor]] = []
    calls = [-1]

    def hook(module: nn.Module, args: Any) -> None:
        if synth.ctx.calls != calls[0]:
            calls[0] = synth.ctx.calls
            seen.append({k: v.detach().clone() for k, v in module.state_dict().items()})

    synth.generator.register_forward_pre_hook(hook)
    return seen


def test_generator_is_redrawn_from_the_seeded_rng_every_call() -> None:
    synth = make()
    seen = _initial_weights(synth)
    student = tiny_student()
    rng_before = [synth.ctx.rng.get_state()]
    steps = []
    for _ in range(2):
        steps.append(synth.synthesize(student))
        rng_before.append(synth.ctx.rng.get_state())
    first, second = seen
    # Two calls start from different weights ...
    assert not torch.equal(first["l1.weight"], second["l1.weight"])
    # ... drawn as CMI's reset_model draws them, from the synthesizer's generator: replaying
    # the reset from the state ctx.rng had when the call began gives the same weights.
    for state, weights in zip(rng_before[:2], seen, strict=True):
        replay = copy.deepcopy(synth.generator)
        _reinit_generator(replay, torch.Generator().set_state(state))
        for k, v in replay.state_dict().items():
            assert torch.equal(v, weights[k]), k
    w = first["blocks.2.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    assert abs(float(first["blocks.0.weight"].mean()) - 1.0) < 0.01
    assert float(first["l1.bias"].abs().max()) == 0.0
    # What the previous call trained is forgotten: scrambling the generator in between does
    # not change the next batch.
    other = make()
    other.synthesize(student)
    with torch.no_grad():
        for p in other.generator.parameters():
            p.mul_(-3.0).add_(1.0)
    assert torch.equal(other.synthesize(student).images, steps[1].images)


@pytest.mark.parametrize("stars", [STARS_ON, StarsConfig()], ids=["stars", "baseline"])
def test_seeded_runs_repeat_and_seeds_differ(stars: StarsConfig) -> None:
    student = tiny_student()
    runs = {s: [make(stars, seed=s) for _ in range(2 if s == 3 else 1)] for s in (3, 4)}
    a, b = ([synth.synthesize(student) for _ in range(2)] for synth in runs[3])
    (c,) = ([synth.synthesize(student) for _ in range(2)] for synth in runs[4])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and x.losses == y.losses and x.trace == y.trace
    assert not torch.equal(a[0].images, c[0].images)
    assert "cr" in a[1].losses and a[1].losses["cr"] > 0


def test_without_the_contrastive_term_runs_repeat_and_skip_it() -> None:
    """``cr_weight: 0`` with STARS off: deterministic, no ``cr`` term, no head step, no bank;
    STARS configured but off leaves it bit for bit."""
    cfg = TINY.model_copy(update={"cr_weight": 0.0})
    student = tiny_student()
    a, b, off = make(cfg=cfg), make(cfg=cfg), make(STARS_OFF_OTHER, cfg=cfg)
    head0 = snapshot(a.head)
    steps = [[s.synthesize(student) for _ in range(2)] for s in (a, b, off)]
    for x, y, z in zip(*steps, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.images, z.images)
        assert "cr" not in x.losses
    assert len(a.features) == 0
    assert all(torch.equal(v, head0[k]) for k, v in snapshot(a.head).items())


def test_checkpoint_resume_continues_identically() -> None:
    """Two calls (the bank wraps on the third), a checkpoint through the safetensors tree
    (only checkpoint-safe values), then two more calls: a synthesizer built with another seed
    and loaded from it makes the same batches, head and bank as the uninterrupted one."""
    student = tiny_student()
    ref = make(STARS_ON)
    for _ in range(2):
        ref.synthesize(student)
    tensors, tree = flatten_state(copy.deepcopy(ref.state_dict()))
    resumed = make(STARS_ON, seed=99)
    resumed.load_state_dict(unflatten_state(tensors, tree))
    for _ in range(2):
        x, y = ref.synthesize(student), resumed.synthesize(student)
        assert torch.equal(x.images, y.images) and x.losses == y.losses
    assert torch.equal(ref.features.rows(), resumed.features.rows())
    assert len(ref.features) == TINY.feature_bank_size
    for k, v in snapshot(ref.head).items():
        assert torch.equal(v, snapshot(resumed.head)[k]), k
    assert len(resumed.ctx.bank) == len(ref.ctx.bank)


def test_it_is_a_synthesizer() -> None:
    synth: Synthesizer = make()
    assert isinstance(synth, Synthesizer)
    assert synth.store and len(synth.bank) == 0


def test_teacher_student_and_global_rng_untouched() -> None:
    teacher = tiny_teacher()
    student = tiny_student()
    student.train()
    t0, s0 = snapshot(teacher), snapshot(student)
    synth = build(TINY, STARS_ON, teacher=teacher, student_vth=1.0)
    global_rng = torch.get_rng_state()
    for _ in range(2):
        synth.synthesize(student)
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert_untouched(teacher, t0, student, s0)
