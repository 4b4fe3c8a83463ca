"""Spike-aware TAR: layer pairing, the maps, the loss and the term on real models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stars.config import NeuronConfig, SpikeTARConfig, StudentConfig
from stars.models.students import build_student
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

# Error model for comparisons of the loss with itself (permuted batch, rescaled map): the loss
# is a float32 mean of at most M = 8 * 6 * 6 squared differences of values in [0, 1 / mean];
# reordering the reductions changes each sum by <= M * 2^-24 relative, so a relative
# tolerance of 1e-4 (with an absolute floor of 1e-6 for losses near 0) covers M <= 1600.
RTOL, ATOL = 1e-4, 1e-6


def maps(seed: int, n: int = 8, h: int = 6, w: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, generator=g), torch.rand(n, h, w, generator=g)


# ----------------------------------------------------------------------------- pairing


@settings(max_examples=100, deadline=None)
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


@settings(max_examples=80, deadline=None)
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
        pbar = float(a_t.mean())
        assert loss <= 1 / max(pbar * (1 - pbar), VARIANCE_FLOOR) + 1e-6
    zero = spike_tail_loss(a_t, a_t, granularity=granularity, normalize=normalize)
    assert float(zero) == 0.0
    perm = torch.randperm(a_s.shape[0], generator=torch.Generator().manual_seed(seed))
    permuted = spike_tail_loss(
        a_s[perm],
        a_t[perm],
        granularity=granularity,
        normalize=normalize,
    )
    assert torch.allclose(permuted, loss, rtol=RTOL, atol=ATOL)


@settings(max_examples=50, deadline=None)
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
    scaled = spike_tail_loss(c * a_t, a_t, granularity=granularity, normalize=True)
    assert float(scaled) <= 4 * (NORMALIZE_EPS / (c * 0.3)) ** 2 * 10 + 1e-10
    base = spike_tail_loss(a_s, a_t, granularity=granularity, normalize=True)
    resc = spike_tail_loss(c * a_s, a_t, granularity=granularity, normalize=True)
    assert torch.allclose(base, resc, rtol=1e-3, atol=1e-5)


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


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), tau=st.floats(0.02, 1.0))
def test_gradient_near_the_threshold(seed: int, tau: float) -> None:
    """Potentials within ``tau`` of the threshold pass a gradient of at least
    ``sigmoid'(1) / tau / M`` each to the student map (M elements averaged): the sigmoid's
    slope is ``>= 0.196 / tau`` there. Far potentials (``> 40 tau``) pass almost none."""
    g = torch.Generator().manual_seed(seed)
    near = (1.0 + (torch.rand(2, 3, 4, 2, 2, generator=g) * 2 - 1) * tau).requires_grad_(True)
    a_s = student_firing_map(near, v_threshold=1.0, tau=tau)
    (grad,) = torch.autograd.grad(a_s.sum(), near)
    m = 2 * 4  # averaged over T and C
    assert (grad >= 0.196 / tau / m * (1 - 1e-4)).all()
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
    assert torch.allclose(gated, per[keep].mean(), rtol=RTOL)
    none = spike_tail_loss(a_s, a_t, weights=torch.zeros(8))
    assert float(none) == 0.0
    with pytest.raises(ValueError, match="batch"):
        spike_tail_loss(a_s, a_t, granularity="batch", normalize=False, weights=w)


def test_maps_at_different_resolutions_are_pooled() -> None:
    """A 4x4 student map against an 8x8 teacher map: the teacher's is average-pooled, so a
    teacher map whose 2x2 blocks average to the student's scores 0."""
    a_s = torch.rand(3, 4, 4)
    a_t = a_s.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert float(spike_tail_loss(a_s, a_t, normalize=False)) < 1e-12
    flat = spike_tail_loss(a_s, a_t.mean((1, 2)), normalize=False)  # [N] against [N, H, W]
    assert float(flat) < 1e-12


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), tail=st.floats(0.01, 0.5))
def test_batch_quantile_thresholds_leave_the_tail_above(seed: int, tail: float) -> None:
    """Continuous values (no ties): at most ``q M`` values lie strictly above the threshold and
    at least ``q M - 1`` do (the k-th order statistic with ``k = ceil((1 - q) M)``)."""
    h = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    theta = batch_quantile_thresholds(h, tail)
    m = 5 * 16
    above = (h > theta.view(1, 3, 1, 1)).sum(dim=(0, 2, 3)).float()
    assert (above <= tail * m + 1e-6).all() and (above >= tail * m - 1 - 1e-6).all()


@settings(max_examples=40, deadline=None)
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


def _student() -> torch.nn.Module:
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
    term = SpikeTailTerm(cfg, extract_bn_prior(teacher))
    x = torch.randn(6, 3, SIZE, SIZE, requires_grad=True)
    bns = teacher.bn_layers()  # type: ignore[operator]
    neurons = [m for _, m in student.spiking_neurons()]  # type: ignore[operator]
    with FeatureTap(bns) as t_tap, MembraneTap(term.tapped(neurons)) as m_tap:
        teacher(x)
        student(x)
        acts = {i: t_tap[m] for i, m in enumerate(bns)}
        loss = term.loss(acts, m_tap, neurons)
        assert len(term.maps(acts, m_tap, neurons)) == len(term.pairs(len(neurons)))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(g).all() and g.abs().sum() > 0
