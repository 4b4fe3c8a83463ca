"""Spike-aware TAR: layer pairing, the maps, the loss and the term on real models."""

from __future__ import annotations

import math

import pytest
import torch
from error_model import U32, U64
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples

from stars.config import NeuronConfig, SpikeTARConfig, StudentConfig
from stars.models.students import SpikingClassifier, build_student
from stars.neurons import MultiStepNeuron
from stars.neurons.membrane import MembraneTap
from stars.synthesis.priors import FeatureTap, extract_bn_prior
from stars.synthesis.spike_tar import (
    NORMALIZE_EPS,
    VARIANCE_FLOOR,
    Granularity,
    SpikeTailTerm,
    batch_quantile_thresholds,
    pair_layers,
    spike_tail_loss,
    student_firing_map,
    teacher_exceedance_map,
)
from synthesis.test_synthesizers import SIZE, K, tiny_teacher

GRANULARITIES: tuple[Granularity, ...] = ("spatial", "sample", "batch")
POOLED: tuple[Granularity, ...] = ("spatial", "sample")

M = 8 * 6 * 6
"""Units of the largest map here (8 samples, 6 x 6)."""


def reorder_tol(loss: float, amax: float) -> float:
    """Two float32 computations of one spike_tail_loss in another order (a permuted batch):
    each mean over <= M units is within M u of its value relative to its terms (error_model),
    so the normalizing means and pbar move the compared values (<= amax) by <= 2 M u amax, a
    squared difference d^2 by <= 2 |d| (that), and the final mean by M u of the loss: with
    mean |d| <= sqrt(loss), twice (both sides) 4 M u amax sqrt(loss) + M u loss."""
    return 2 * (4 * M * U32 * amax * math.sqrt(loss) + M * U32 * loss)


def maps(seed: int, n: int = 8, h: int = 6, w: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, generator=g), torch.rand(n, h, w, generator=g)


# ----------------------------------------------------------------------------- pairing


@examples(100)
@given(s=st.integers(1, 40), t=st.integers(1, 60))
def test_auto_pairing_by_relative_depth(s: int, t: int) -> None:
    """Every student layer gets a teacher layer in range, the order is kept (non-decreasing),
    the last meets the last, and each lands at its relative depth (within one layer)."""
    pairs = pair_layers(s, t)
    assert [a for a, _ in pairs] == list(range(s))
    teachers = [b for _, b in pairs]
    assert all(0 <= b < t for b in teachers)
    assert teachers == sorted(teachers)
    assert teachers[-1] == t - 1
    for a, b in pairs:
        assert abs((b + 1) / t - (a + 1) / s) <= 1 / t + 1e-12


def test_explicit_pairs_stages_and_errors() -> None:
    assert pair_layers(4, 21, pairs=[(-1, -1), (0, 3)]) == [(3, 20), (0, 3)]
    assert pair_layers(4, 21, stages=[-1, 0]) == [(0, 5), (3, 20)]
    with pytest.raises(ValueError, match="out of range"):
        pair_layers(4, 21, stages=[4])
    with pytest.raises(ValueError, match="out of range"):
        pair_layers(4, 21, pairs=[(0, 21)])
    with pytest.raises(ValueError, match="twice"):
        pair_layers(4, 21, pairs=[(0, 1), (0, 2)])
    with pytest.raises(ValueError, match="no layer"):
        pair_layers(4, 21, stages=[])


def test_tiny_student_meets_the_teacher_at_its_own_resolution() -> None:
    """spiking_tiny (32/16/8/4 px) against ResNet-20 (21 BN layers at 32/16/8 px): the auto
    pairing puts each student layer on a teacher layer of the same size (the last student
    layer, at 4 px, on the teacher's last, at 8 px: the coarsest it has)."""
    assert pair_layers(4, 21) == [(0, 5), (1, 10), (2, 15), (3, 20)]


# ----------------------------------------------------------------------------- the loss


@examples(80)
@given(
    seed=st.integers(0, 2**16),
    granularity=st.sampled_from(GRANULARITIES),
    normalize=st.booleans(),
)
def test_bounds_zero_at_target_and_permutation(
    seed: int, granularity: Granularity, normalize: bool
) -> None:
    if granularity == "batch" and normalize:
        return
    a_s, a_t = maps(seed)
    loss = spike_tail_loss(a_s, a_t, granularity=granularity, normalize=normalize)
    assert loss >= 0
    if not normalize:
        # each (a_s - a_t)^2 <= 1 (maps in [0, 1]); over v, and a mean of M terms: (1 + M u) / v
        pbar = float(a_t.mean())
        assert loss <= (1 + M * U32) / max(pbar * (1 - pbar), VARIANCE_FLOOR)
    zero = spike_tail_loss(a_t, a_t, granularity=granularity, normalize=normalize)
    assert float(zero) == 0.0
    perm = torch.randperm(a_s.shape[0], generator=torch.Generator().manual_seed(seed))
    permuted = spike_tail_loss(
        a_s[perm],
        a_t[perm],
        granularity=granularity,
        normalize=normalize,
    )
    # compared values: maps in [0, 1], over their means (>= min over the units) when normalized
    amax = 1 / min(float(a_s.flatten(1).mean(1).min()), float(a_t.flatten(1).mean(1).min()))
    tol = reorder_tol(float(loss), amax if normalize else 1 / VARIANCE_FLOOR)
    assert float(permuted) == pytest.approx(float(loss), abs=tol)


@examples(50)
@given(
    seed=st.integers(0, 2**16),
    c=st.floats(0.05, 0.9),
    granularity=st.sampled_from(POOLED),
)
def test_normalized_loss_ignores_the_firing_level(
    seed: int, c: float, granularity: Granularity
) -> None:
    """With ``normalize`` only the pattern counts: a student map proportional to the target
    scores 0 up to the epsilon in the normalization (relative ``eps / mean`` per side, which
    is below 1e-5 for the maps here: mean >= 0.05 * 0.3), and any rescaling of the student's
    map leaves the loss unchanged up to that."""
    a_s, a_t = maps(seed)
    a_t = a_t * 0.7 + 0.3
    # Exactly: c a / (c m + eps) - a / (m + eps) = a eps (c - 1) / ((c m + eps)(m + eps)), at
    # most (a / m) eps / (c m) <= (1 / 0.3) eps / (0.3 c) per unit (a in [0.3, 1], m >= 0.3).
    # float32: both normalized maps (values <= 1 / 0.3) are within (M + 4) u relative of theirs.
    gap = NORMALIZE_EPS / (0.3 * 0.3 * c) + 2 * (M + 4) * U32 / 0.3
    scaled = spike_tail_loss(c * a_t, a_t, granularity=granularity, normalize=True)
    assert float(scaled) <= gap**2 * (1 + M * U32)
    # Rescaling the student's map moves each normalized value s by <= s eps / (c m_s) (as
    # above), plus float32 rounding, so the loss moves by <= 2 sqrt(loss) d + d^2.
    base = spike_tail_loss(a_s, a_t, granularity=granularity, normalize=True)
    resc = spike_tail_loss(c * a_s, a_t, granularity=granularity, normalize=True)
    m_s = float(a_s.flatten(1).mean(1).min())
    s_max = 1 / m_s
    d = s_max * NORMALIZE_EPS / (c * m_s) + 2 * (M + 4) * U32 * (s_max + 1 / 0.3)
    tol = 2 * math.sqrt(float(base)) * d + d * d + 2 * M * U32 * float(base)
    assert float(resc) == pytest.approx(float(base), abs=tol)


def test_finite_and_bounded_at_extremes() -> None:
    """Silent and saturated maps (every student potential far below or above threshold) give
    a finite loss and a finite gradient; a map of zeros with ``normalize`` uses the epsilon."""
    h = torch.tensor([-1e6, 1e6]).repeat(2, 4, 3, 2, 1).requires_grad_(True)  # [T, N, C, 2, 2]
    assert set(torch.unique(student_firing_map(h, v_threshold=1.0, tau=0.1)).tolist()) <= {0.0, 1.0}
    t = torch.zeros(4, 2, 2)
    for normalize in (True, False):
        a_s = student_firing_map(h, v_threshold=1.0, tau=0.1)
        loss = spike_tail_loss(a_s, t, normalize=normalize)
        (g,) = torch.autograd.grad(loss, h)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    silent = torch.zeros(4, 2, 2, requires_grad=True)
    loss = spike_tail_loss(silent, torch.rand(4, 2, 2), normalize=True)
    (g,) = torch.autograd.grad(loss, silent)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


@examples(40)
@given(seed=st.integers(0, 2**16), tau=st.floats(0.02, 1.0))
def test_gradient_near_the_threshold(seed: int, tau: float) -> None:
    """Potentials within ``tau`` of the threshold pass a gradient of at least
    ``sigmoid'(1) / tau / M`` each to the student map (M elements averaged): the sigmoid's
    slope is ``>= 0.196 / tau`` there. Far potentials (``> 40 tau``) pass almost none."""
    g = torch.Generator().manual_seed(seed)
    near = (1.0 + (torch.rand(2, 3, 4, 2, 2, generator=g) * 2 - 1) * tau).requires_grad_(True)
    a_s = student_firing_map(near, v_threshold=1.0, tau=tau)
    (grad,) = torch.autograd.grad(a_s.sum(), near)
    m = 2 * 4  # averaged over T and C (a power of 2: the 1 / m is exact)
    # sigmoid'(1) = 0.196612: 0.196 is 3e-3 below it, far more than float32 moves it (the
    # argument by <= 2 u / tau <= 100 u, sigmoid' itself by a few u).
    assert (grad >= 0.196 / tau / m).all()
    far = (1.0 + 41 * tau * torch.sign(torch.randn(2, 3, 4, 2, 2, generator=g))).requires_grad_(
        True
    )
    (grad_far,) = torch.autograd.grad(student_firing_map(far, v_threshold=1.0, tau=tau).sum(), far)
    assert (grad_far.abs() < 1e-16 / tau).all()


def test_gate_selects_samples() -> None:
    a_s, a_t = maps(3)
    w = torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0])
    keep = w.bool()
    gated = spike_tail_loss(a_s, a_t, granularity="sample", normalize=False, weights=w)
    pbar = float(a_t.flatten(1).mean(1).mean())
    per = (a_s.flatten(1).mean(1) - a_t.flatten(1).mean(1)).pow(2) / max(pbar * (1 - pbar), 1e-3)
    # the same terms, in another order (the mean over the 3 kept samples, a weighted sum)
    ref = float(per[keep].mean())
    assert float(gated) == pytest.approx(ref, abs=reorder_tol(ref, 1 / VARIANCE_FLOOR))
    none = spike_tail_loss(a_s, a_t, weights=torch.zeros(8))
    assert float(none) == 0.0
    with pytest.raises(ValueError, match="batch"):
        spike_tail_loss(a_s, a_t, granularity="batch", normalize=False, weights=w)


def test_maps_at_different_resolutions_are_pooled() -> None:
    """A 4x4 student map against an 8x8 teacher map: the teacher's is average-pooled, so a
    teacher map whose 2x2 blocks average to the student's scores 0."""
    a_s = torch.rand(3, 4, 4)
    a_t = a_s.repeat_interleave(2, 1).repeat_interleave(2, 2)
    # Exactly 0: each 2 x 2 block of equal values sums (and divides by 4) without rounding.
    assert float(spike_tail_loss(a_s, a_t, normalize=False)) == 0.0
    # [N] against [N, H, W]: a mean of 64 and one of 16 values in [0, 1], each within n u of
    # the exact common value, so the squared difference over v is <= (80 u)^2 / v.
    flat = spike_tail_loss(a_s, a_t.mean((1, 2)), normalize=False)
    pbar = float(a_t.mean())
    assert float(flat) <= (80 * U32) ** 2 / max(pbar * (1 - pbar), VARIANCE_FLOOR)


@examples(40)
@given(seed=st.integers(0, 2**16), tail=st.floats(0.01, 0.5))
def test_batch_quantile_thresholds_leave_the_tail_above(seed: int, tail: float) -> None:
    """Continuous values (no ties): at most ``q M`` values lie strictly above the threshold and
    at least ``q M - 1`` do (the k-th order statistic with ``k = ceil((1 - q) M)``)."""
    h = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    theta = batch_quantile_thresholds(h, tail)
    m = 5 * 16
    above = (h > theta.view(1, 3, 1, 1)).sum(dim=(0, 2, 3)).float()
    # integer counts against q m: the implementation's ceil((1 - q) m - 1e-9) allows 1e-9
    slack = 1e-9 + 4 * U64 * m
    assert (above <= tail * m + slack).all() and (above >= tail * m - 1 - slack).all()


@examples(40)
@given(seed=st.integers(0, 2**16))
def test_teacher_map_tends_to_the_exceedance_fraction(seed: int) -> None:
    """As ``tau -> 0`` the soft exceedance map is the fraction of channels above threshold,
    off by at most ``exp(-d_min / tau)`` per element (d_min: the closest value's distance)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    theta = torch.randn(4, generator=g, dtype=torch.float64) * 0.5
    tau = torch.full((4,), 1e-3, dtype=torch.float64)
    soft = teacher_exceedance_map(h, theta, tau)
    hard = (h > theta.view(1, 4, 1, 1)).double().mean(1)
    d_min = float((h - theta.view(1, 4, 1, 1)).abs().min())
    # float32 inside: the sigmoid's argument loses (|h| + |theta|) 2^-24 / tau
    bound = torch.exp(torch.tensor(-d_min / 1e-3)) + 8 * 2.0**-24 / 1e-3 + 1e-6
    assert ((soft.double() - hard).abs() <= bound).all()


# ----------------------------------------------------------------------------- the term


def _student() -> SpikingClassifier:
    torch.manual_seed(1)
    return build_student(
        StudentConfig(arch="spiking_tiny", T=2, neuron=NeuronConfig(v_threshold=0.5)),
        num_classes=K,
        image_size=SIZE,
    )


@pytest.mark.parametrize(
    "cfg",
    [
        SpikeTARConfig(weight=1.0),
        SpikeTARConfig(weight=1.0, granularity="sample", threshold="batch-quantile"),
        SpikeTARConfig(weight=1.0, target="gaussian", normalize=False, granularity="batch"),
        SpikeTARConfig(weight=1.0, pairs=((0, 0), (-1, -1))),
    ],
)
def test_term_reaches_the_images_through_the_student(cfg: SpikeTARConfig) -> None:
    teacher, student = tiny_teacher(), _student()
    student.eval()
    term = SpikeTailTerm(cfg, extract_bn_prior(teacher.bn_layers()))
    x = torch.randn(6, 3, SIZE, SIZE, requires_grad=True)
    bns = teacher.bn_layers()
    neurons = [m for _, m in student.spiking_neurons()]
    with FeatureTap(bns) as t_tap, MembraneTap(term.tapped(neurons)) as m_tap:
        teacher(x)
        student(x)
        acts = {i: t_tap[m] for i, m in enumerate(bns)}
        loss = term.loss(acts, m_tap, neurons)
        assert len(term.maps(acts, m_tap, neurons)) == len(term.pairs(len(neurons)))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_term_student_map_is_the_replayed_potentials_map() -> None:
    """The term's ``a_s`` (the fused one-pass map) is ``student_firing_map`` of the tap's
    replayed potentials, in value and in its gradient to the images. float64 throughout: both
    sides compute the same sums in a different order, so they agree to a few ulps of 1.0 per
    term (sums of T*C <= 16 sigmoids); 1e-12 is far above that and far below any change a wrong
    recurrence, threshold or temperature would make (>= 1e-3 on these maps)."""
    teacher, student = tiny_teacher().double(), _student().double()
    student.eval()
    cfg = SpikeTARConfig(weight=1.0)
    term = SpikeTailTerm(cfg, extract_bn_prior(teacher.bn_layers()))
    x = torch.randn(5, 3, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    bns = teacher.bn_layers()
    neurons = [m for _, m in student.spiking_neurons()]
    with FeatureTap(bns) as t_tap, MembraneTap(term.tapped(neurons)) as m_tap:
        teacher(x)
        student(x)
        acts = {i: t_tap[m] for i, m in enumerate(bns)}
        fused = [a_s for a_s, _ in term.maps(acts, m_tap, neurons)]
        replayed = []
        for s, _ in term.pairs(len(neurons)):
            neuron = neurons[s]
            assert isinstance(neuron, MultiStepNeuron)
            vth = neuron.v_threshold
            replayed.append(
                student_firing_map(m_tap[neurons[s]], v_threshold=vth, tau=cfg.tau_rel * vth)
            )
    assert len(fused) == len(replayed) > 0
    for a, b in zip(fused, replayed, strict=True):
        assert a.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-12)
    w = [torch.randn_like(a) for a in fused]
    y_fused = torch.stack([(a * v).sum() for a, v in zip(fused, w, strict=True)]).sum()
    y_replayed = torch.stack([(b * v).sum() for b, v in zip(replayed, w, strict=True)]).sum()
    (g_fused,) = torch.autograd.grad(y_fused, x, retain_graph=True)
    (g_replayed,) = torch.autograd.grad(y_replayed, x)
    assert g_fused.abs().sum() > 0
    torch.testing.assert_close(g_fused, g_replayed, rtol=1e-9, atol=1e-12)
