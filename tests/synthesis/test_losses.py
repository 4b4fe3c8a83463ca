"""Synthesis losses (stars.synthesis.losses): property tests."""

from __future__ import annotations

import math
import re
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from error_model import (
    U32,
    U64,
    kl_error,
    mean_error,
    rca_max,
    rca_reorder_tol,
    relation_error,
    variance_error,
)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import Tensor, nn

from stars.config import TARConfig
from stars.synthesis.losses import (
    adversarial_masked_kl,
    bn_matching,
    class_cross_entropy,
    dafl_activation,
    dafl_information_entropy,
    dfad_l1,
    image_l2,
    momentum_stats,
    rca_adversarial,
    rca_loss,
    relation_matrix,
    soft_exceedance,
    tar_loss,
    tar_loss_with_exceedances,
    total_variation,
)
from stars.synthesis.priors import (
    BNLayerPrior,
    BNPrior,
    FeatureTap,
    TailLayerPrior,
    TailPrior,
    batch_stats,
    extract_bn_prior,
    extract_tail_prior,
)

FAST = examples(15)
DELTA = 1e-4
seeds = st.integers(0, 2**16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- BN matching


@FAST
@given(seed=seeds, n=st.integers(2, 4), c=st.integers(1, 4), hw=st.integers(1, 4))
def test_bn_matching_is_zero_at_the_running_statistics(seed: int, n: int, c: int, hw: int) -> None:
    g = _gen(seed)
    x = (torch.randn(n, c, hw, hw, generator=g) * 2 + 0.5).requires_grad_()
    bn = nn.BatchNorm2d(c).eval()
    mean, var = batch_stats(x.detach())
    bn.running_mean, bn.running_var = mean.clone(), var.clone()
    prior = extract_bn_prior([bn])
    with FeatureTap([bn]) as tap:
        bn(x)
        loss = bn_matching(list(tap.values()), prior)
    # Exactly 0: the prior holds the statistics of this very tensor, from the same kernel.
    assert float(loss.detach()) == 0.0
    torch.autograd.backward(loss)
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    # Shifting the batch by 1 moves each channel's mean by exactly 1 and keeps its variance, so
    # the distance is sqrt(c). Checked in float64 (x + 1 is exact there) against a float64
    # prior: the C means and variances of m values |x| <= a are off by mean_error and
    # variance_error with u = 2^-53, and the two norms add them up over the C channels.
    x64 = x.detach().double()
    bn64 = nn.BatchNorm2d(c).double().eval()
    bn64.running_mean, bn64.running_var = batch_stats(x64)
    m, a = n * hw * hw, float(x64.abs().max()) + 1.0
    tol = 2 * c * (mean_error(m, a, U64) + variance_error(m, a, U64))
    shifted = bn_matching([x64 + 1.0], extract_bn_prior([bn64]))
    assert float(shifted) == pytest.approx(math.sqrt(c), abs=tol)


@FAST
@given(seed=seeds)
def test_bn_matching_matches_definition_and_accepts_stats(seed: int) -> None:
    g = _gen(seed)
    bns = [nn.BatchNorm2d(3), nn.BatchNorm2d(2)]
    for bn in bns:
        bn.running_mean = torch.randn(bn.num_features, generator=g)
        bn.running_var = torch.rand(bn.num_features, generator=g) * 1.5 + 0.5
    prior = extract_bn_prior(bns)
    feats = [torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 2, 3, 3, generator=g)]
    # The definition, in float64 from the same float32 values.
    ref = sum(
        float(torch.linalg.vector_norm(f.double().mean((0, 2, 3)) - layer.running_mean.double()))
        + float(
            torch.linalg.vector_norm(
                f.double().var((0, 2, 3), unbiased=False) - layer.running_var.double()
            )
        )
        for f, layer in zip(feats, prior.layers, strict=True)
    )
    # float32: per layer, C means and variances of m values |x| <= a off by mean_error and
    # variance_error (a norm moves by at most the sum of its entries' errors), and each of the
    # two norms adds its own rounding, (C + 3) u <= 6 u of its value.
    tol = (
        sum(
            f.shape[1] * (mean_error(f.numel() // f.shape[1], float(f.abs().max())))
            + f.shape[1] * variance_error(f.numel() // f.shape[1], float(f.abs().max()))
            for f in feats
        )
        + 12 * U32 * ref
    )
    loss = float(bn_matching(feats, prior))
    assert loss == pytest.approx(ref, abs=tol)
    stats = [batch_stats(f) for f in feats]
    assert float(bn_matching(stats, prior)) == loss  # the same kernels on the same values
    # Momentum with previous == current changes nothing but the roundings of the blend
    # 0.9 s + (1 - 0.9) s (two products and a sum: 3 u |s| per statistic; a norm moves by at
    # most the sum over its entries), plus the norms' own rounding on both sides (12 u).
    same = bn_matching(feats, prior, previous=stats, momentum=0.9)
    blend_tol = 3 * U32 * sum(float(m.abs().sum() + v.abs().sum()) for m, v in stats)
    assert float(same) == pytest.approx(loss, abs=blend_tol + 24 * U32 * loss)
    prev = [(m + 1.0, v * 2.0) for m, v in stats]
    blended = momentum_stats(stats, prev, momentum=0.25)
    for (bm, bv), (m, v), (pm, pv) in zip(blended, stats, prev, strict=True):
        # the same two products and sum, in the same order: bitwise equal
        assert torch.equal(bm, 0.25 * pm + 0.75 * m)
        assert torch.equal(bv, 0.25 * pv + 0.75 * v)
    with pytest.raises(ValueError, match="BN layers"):
        bn_matching(feats[:1], prior)


# ----------------------------------------------------------------------------- logits terms


def test_class_cross_entropy_matches_torch() -> None:
    logits = torch.randn(5, 4, generator=_gen(0))
    y = torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(class_cross_entropy(logits, y), F.cross_entropy(logits, y))


@FAST
@given(seed=seeds, temperature=st.sampled_from([1.0, 2.0, 4.0]))
def test_adversarial_masked_kl_ignores_disagreeing_samples(seed: int, temperature: float) -> None:
    g = _gen(seed)
    t = torch.randn(6, 5, generator=g) * 3
    s = torch.randn(6, 5, generator=g) * 3
    loss = adversarial_masked_kl(t, s, temperature=temperature)
    agree = t.argmax(1) == s.argmax(1)
    # Reference: -mean(KL * mask) * T^2 with torch's kl_div, in float64 from the same values.
    t64, s64 = t.double(), s.double()
    kl = F.kl_div(
        F.log_softmax(s64 / temperature, 1), F.softmax(t64 / temperature, 1), reduction="none"
    ).sum(1)
    ref = -(kl * agree.double()).mean() * temperature**2
    # Error model: kl_error per sample (the masked mean keeps it), in each precision; the
    # float64 loss is also checked, so that the reference's own rounding is covered.
    z_max = max(float(t.abs().max()), float(s.abs().max())) / temperature
    tol64 = 2 * kl_error(z_max, 5, temperature, U64)
    exact = adversarial_masked_kl(t64, s64, temperature=temperature)
    torch.testing.assert_close(exact, ref, atol=tol64, rtol=0)
    tol = kl_error(z_max, 5, temperature) + tol64
    assert float(loss) == pytest.approx(float(ref), abs=tol)
    assert float(loss) <= tol  # the exact value is <= 0
    # Changing the student's logits on disagreeing samples (keeping them disagreeing)
    # does not change the loss.
    s2 = s.clone()
    for i in torch.nonzero(~agree).flatten().tolist():
        noise = torch.randn(5, generator=g)
        noise[t[i].argmax()] = -100.0
        s2[i] = noise
    # Exactly: the masked rows add 0 * (a finite KL) = 0 to the same sum.
    assert torch.equal(adversarial_masked_kl(t, s2, temperature=temperature), loss)
    # Exactly 0: both log-probabilities are the same computation.
    assert float(adversarial_masked_kl(t, t, temperature=temperature)) == 0.0
    # The default temperature is 1.
    default = adversarial_masked_kl(t, s)
    assert torch.equal(default, adversarial_masked_kl(t, s, temperature=1.0))


def _entropy_tol(k: int, n: int, base: float = 10.0) -> float:
    """float32 error of dafl_information_entropy (k classes, n samples): each log pbar is off by
    d <= 8 u (log k + log n + 1) (log_softmax, logsumexp, the log n subtraction); pbar log pbar
    then moves by pbar d |1 + log pbar| <= d (pbar + 1/e), k of them d (1 + k/e); the k-term sum
    adds (k + 1) u log k, and the division by ln(base) scales it all."""
    d = 8 * U32 * (math.log(k) + math.log(n) + 1)
    return (d * (1 + k / math.e) + (k + 1) * U32 * math.log(k)) / math.log(base)


def test_dafl_terms() -> None:
    f = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    assert float(dafl_activation(f)) == -1.5  # 6 / 4: exact in float32
    k = 10
    uniform = torch.zeros(4, k)
    tol = _entropy_tol(k, 4)
    assert float(dafl_information_entropy(uniform)) == pytest.approx(-math.log10(k), abs=tol)
    assert float(dafl_information_entropy(uniform, base=math.e)) == pytest.approx(
        -math.log(k), abs=_entropy_tol(k, 4, math.e)
    )
    one_class = torch.zeros(4, k)
    one_class[:, 3] = 1000.0
    collapsed = dafl_information_entropy(one_class)
    assert float(collapsed) == pytest.approx(0.0, abs=tol)
    assert torch.isfinite(collapsed)
    # Balanced but confident predictions reach the minimum too.
    balanced = torch.full((k, k), -1000.0).fill_diagonal_(1000.0)
    assert float(dafl_information_entropy(balanced)) == pytest.approx(
        -math.log10(k), abs=_entropy_tol(k, k)
    )
    logits = torch.randn(8, k, generator=_gen(1), requires_grad=True)
    value = dafl_information_entropy(logits)
    tol = _entropy_tol(k, 8)
    assert -math.log10(k) - tol <= float(value.detach()) <= tol
    torch.autograd.backward(value)
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_dfad_l1() -> None:
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    s = torch.tensor([[0.0, 2.0], [3.0, 6.0]])
    assert float(dfad_l1(t, s)) == 0.75  # 3 / 4: exact in float32
    assert float(dfad_l1(t, t)) == 0.0


# ----------------------------------------------------------------------------- image priors


@FAST
@given(value=st.floats(-3.0, 3.0), n=st.integers(1, 3), hw=st.integers(1, 5))
def test_total_variation_of_constant_images_is_zero(value: float, n: int, hw: int) -> None:
    x = torch.full((n, 3, hw, hw), value)
    assert float(total_variation(x, p=1)) == 0.0
    assert float(total_variation(x, p=2)) == 0.0


def test_total_variation_values_and_image_l2() -> None:
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    # Differences: horizontal (1 of 2 nonzero), vertical (1 of 2), each diagonal (1 of 1
    # for the main one, 0 of 1 for the anti-diagonal).
    # exact in float32: means and norms of 0s and 1s over 1 or 2 elements
    assert float(total_variation(x, p=1)) == 0.5 + 0.5 + 0.0 + 1.0
    assert float(total_variation(x, p=2)) == 1.0 + 1.0 + 0.0 + 1.0
    y = torch.randn(2, 3, 4, 4, generator=_gen(2))
    assert float(total_variation(y)) > 0
    # a float32 norm of m terms: (m + 2) u relative (the squares' sum, then the sqrt)
    ref = float(y.double().pow(2).sum().sqrt())
    assert float(image_l2(y)) == pytest.approx(ref, rel=(y.numel() + 2) * U32)


# ----------------------------------------------------------------------------- RCA


def _features(seed: int, b: int, d: int) -> Tensor:
    return torch.randn(b, d, generator=_gen(seed))


@FAST
@given(seed=seeds, b=st.integers(1, 8), d=st.integers(1, 6))
def test_relation_matrix_is_symmetric_with_unit_diagonal(seed: int, b: int, d: int) -> None:
    z = _features(seed, b, d) * 3
    r = relation_matrix(z, delta=DELTA)
    assert r.shape == (b, b)
    e = relation_error(d)  # per entry, float32
    torch.testing.assert_close(r, r.T, atol=2 * e, rtol=0)
    sq = z.pow(2).sum(1)  # the same reduction as inside: the same values
    torch.testing.assert_close(torch.diagonal(r), sq / (sq + DELTA), atol=e + 2 * U32, rtol=0)
    assert (r.abs() <= 1.0 + e).all()
    # The definition, in float64: R_ij = <z_i, z_j> / sqrt((|z_i|^2 + delta)(|z_j|^2 + delta)).
    z64 = z.double()
    q = z64.pow(2).sum(1) + DELTA
    ref = (z64 @ z64.T) / torch.sqrt(q[:, None] * q[None, :])
    torch.testing.assert_close(
        relation_matrix(z64, delta=DELTA), ref, atol=2 * relation_error(d, U64), rtol=0
    )
    # Flattening beyond dim 1: the same values, the same computation.
    assert torch.equal(relation_matrix(z.view(b, d, 1, 1), delta=DELTA), r)


@FAST
@given(
    seed=seeds,
    b=st.integers(1, 8),
    d=st.integers(1, 6),
    scale=st.floats(0.5, 20.0),
)
def test_rca_is_zero_at_agreement_and_under_positive_rescaling(
    seed: int, b: int, d: int, scale: float
) -> None:
    z = _features(seed, b, d) * 2 + 0.1
    assert float(rca_loss(z, z, delta=DELTA)) == 0.0
    # Per-sample positive scales: R changes only through delta. Row i of n(z) is the unit
    # vector times a_i = sqrt(q_i / (q_i + delta)) in [1 - delta / q_min, 1] (q_i = |z_i|^2),
    # so each entry of R moves by at most delta / q_min and L_rca <= (delta / q_min)^2.
    # float32: each computed entry is within relation_error of its exact value, and rounding
    # z * scale turns each row by <= u (2 u per entry): the entries move by <= delta / q_min +
    # 2 e + 2 u.
    g = _gen(seed + 1)
    scales = scale * (0.5 + torch.rand(b, 1, generator=g))
    zs = z * scales
    q_min = float(torch.minimum(z.pow(2).sum(1), zs.pow(2).sum(1)).min())
    bound = (DELTA / q_min + 2 * relation_error(d) + 2 * U32) ** 2
    assert float(rca_loss(z, zs, delta=DELTA)) <= bound


@FAST
@given(seed=seeds, b=st.integers(1, 8), dt=st.integers(1, 6), ds=st.integers(1, 6))
def test_rca_is_bounded_and_permutation_invariant(seed: int, b: int, dt: int, ds: int) -> None:
    zt, zs = _features(seed, b, dt), _features(seed + 7, b, ds)
    loss = rca_loss(zt, zs, delta=DELTA)
    assert 0.0 <= float(loss) <= rca_max(dt, ds, b)
    perm = torch.randperm(b, generator=_gen(seed + 3))
    permuted = float(rca_loss(zt[perm], zs[perm], delta=DELTA))
    assert permuted == pytest.approx(float(loss), abs=rca_reorder_tol(dt, ds, b, float(loss)))
    # The bound is reached by opposite relations. Exactly 2: 1 + 1e-12 rounds to 1 in float32,
    # so R = [[1, -1], [-1, 1]] against all ones, and 2 of the 4 entries differ by 2.
    v = torch.tensor([[1.0], [-1.0]])
    anti = rca_loss(v, torch.tensor([[1.0], [1.0]]), delta=1e-12)
    assert float(anti) == 2.0


@FAST
@given(seed=seeds, b=st.integers(2, 8), silent=st.integers(1, 8))
def test_rca_gradient_is_finite_and_bounded_for_silent_samples(
    seed: int, b: int, silent: int
) -> None:
    zt = _features(seed, b, 5)
    zs = torch.rand(b, 6, generator=_gen(seed + 1))
    zs[: min(silent, b)] = 0.0  # a spiking student's silent samples: all-zero rates
    zs.requires_grad_()
    loss = rca_loss(zt, zs, delta=DELTA)
    torch.autograd.backward(loss)
    assert zs.grad is not None
    assert torch.isfinite(zs.grad).all()
    # |dL/dz| <= 2 * 4 / sqrt(delta) * 4 / B is a crude analytic bound; the F.normalize
    # form measured 2.3e11 here.
    assert float(zs.grad.abs().max()) <= 32.0 / math.sqrt(DELTA)


@FAST
@given(seed=seeds, b=st.integers(2, 8))
def test_rca_adversarial_only_sees_agreed_samples(seed: int, b: int) -> None:
    g = _gen(seed)
    zt, zs = torch.randn(b, 4, generator=g), torch.randn(b, 5, generator=g)
    t_logits, s_logits = torch.randn(b, 3, generator=g), torch.randn(b, 3, generator=g)
    agree = t_logits.argmax(1) == s_logits.argmax(1)
    loss = rca_adversarial(zt, zs, t_logits, s_logits, delta=DELTA)
    assert -rca_max(4, 5, b) <= float(loss) <= 0.0
    if int(agree.sum()) >= 2:
        ref = -float(rca_loss(zt[agree], zs[agree], delta=DELTA))
        assert float(loss) == pytest.approx(ref, abs=rca_reorder_tol(4, 5, b, ref))
    else:
        assert float(loss) == 0.0
    # Changing the features of disagreeing samples changes nothing, exactly: each entry of R is
    # the same dot product of the same two rows, and the masked entries add 0 to the same sum.
    zs2 = zs.clone()
    zs2[~agree] = torch.randn(int((~agree).sum()), 5, generator=g) * 10
    assert torch.equal(rca_adversarial(zt, zs2, t_logits, s_logits, delta=DELTA), loss)


def test_rca_adversarial_is_a_finite_zero_with_graph_when_fewer_than_two_agree() -> None:
    zt = torch.randn(3, 4, requires_grad=True)
    zs = torch.zeros(3, 4, requires_grad=True)
    t_logits = torch.eye(3)
    s_logits = torch.eye(3).roll(1, dims=1)
    s_logits[0] = t_logits[0]  # exactly one agrees
    loss = rca_adversarial(zt, zs, t_logits, s_logits, delta=DELTA)
    assert float(loss.detach()) == 0.0
    assert loss.requires_grad
    torch.autograd.backward(loss)
    assert zt.grad is not None
    assert zs.grad is not None
    assert torch.isfinite(zt.grad).all()
    assert float(zs.grad.abs().sum()) == 0.0


# ----------------------------------------------------------------------------- TAR


@FAST
@given(seed=seeds, k=st.integers(1, 3), c=st.integers(1, 4), tau=st.floats(0.01, 2.0))
def test_soft_exceedance_is_a_monotone_probability(seed: int, k: int, c: int, tau: float) -> None:
    g = _gen(seed)
    h = torch.randn(4, c, 3, 3, generator=g) * 2
    theta = torch.randn(k, c, generator=g)
    taus = torch.full((c,), tau)
    e = soft_exceedance(h, theta, taus)
    assert e.shape == (k, c)
    assert ((e >= 0) & (e <= 1)).all()
    # Each e is a mean of M = 36 sigmoids in [0, 1], each off by <= 2 u (exp, then a division):
    # within (M + 2) u of its exact value, so two of them are within 2 (M + 2) u of each other.
    tol = 2 * (4 * 3 * 3 + 2) * U32
    shifted = soft_exceedance(h + torch.rand(h.shape, generator=g), theta, taus)
    assert (shifted >= e - tol).all()
    # [N, C] activations work the same, and so do channels-last ones (not contiguous).
    flat = h.permute(0, 2, 3, 1).reshape(-1, c)
    torch.testing.assert_close(soft_exceedance(flat, theta, taus), e, atol=tol, rtol=0)
    last = h.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(soft_exceedance(last, theta, taus), e, atol=tol, rtol=0)


@FAST
@given(
    seed=seeds,
    k=st.integers(1, 3),
    c=st.integers(1, 3),
    tau=st.floats(0.05, 2.0),
    spatial=st.booleans(),
)
def test_soft_exceedance_gradient_is_exact(
    seed: int, k: int, c: int, tau: float, spatial: bool
) -> None:
    """The lean backward equals autograd through mean(sigmoid((h - theta) / tau)), and
    passes gradcheck in float64."""
    g = _gen(seed)
    shape = (3, c, 2, 2) if spatial else (5, c)
    h = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    theta = torch.randn(k, c, generator=g, dtype=torch.float64)
    taus = torch.full((c,), tau, dtype=torch.float64)
    upstream = torch.randn(k, c, generator=g, dtype=torch.float64)
    (fast,) = torch.autograd.grad((soft_exceedance(h, theta, taus) * upstream).sum(), h)
    view = (1, c) + (1,) * (len(shape) - 2)
    dims = (0, *range(2, len(shape)))
    ref_e = torch.stack(
        [torch.sigmoid((h - theta[j].view(view)) / taus.view(view)).mean(dims) for j in range(k)]
    )
    (ref,) = torch.autograd.grad((ref_e * upstream).sum(), h)
    # float64: each entry is sum_k up_k s (1 - s) / (tau M). The two forms of the sigmoid's
    # argument, x / tau - theta / tau and (x - theta) / tau, differ by <= 3 u (|x| + |theta|) /
    # tau, which moves s (1 - s) (slope <= 0.1) by 0.3 u (|x| + |theta|) / tau; each form's
    # own rounding of s (1 - s) / (tau M) is <= 8 u / 4: per k, |up_k| / (tau M) times that.
    m = h.numel() // c
    mag = float(upstream.abs().max()) * k / (tau * m)
    arg = float(h.detach().abs().max()) + float(theta.abs().max())
    tol = mag * U64 * (0.3 * arg / tau + 8)
    torch.testing.assert_close(fast, ref, atol=tol, rtol=0)
    # gradcheck's own tolerances (atol 1e-5, rtol 1e-3) hold by a wide margin: its central
    # differences (step 1e-6) are off by ~ step^2 |e^(3)| <= 1e-12 / tau^3 <= 1e-8 here, plus
    # u / step ~ 1e-10 of rounding.
    assert torch.autograd.gradcheck(lambda x: soft_exceedance(x, theta, taus), (h,))


@FAST
@given(seed=seeds, c=st.integers(1, 3))
def test_soft_exceedance_tends_to_the_indicator_fraction(seed: int, c: int) -> None:
    g = _gen(seed)
    h = torch.randn(8, c, 4, 4, generator=g)
    theta = torch.randn(2, c, generator=g)
    # Keep activations away from the thresholds so the limit is clean.
    for _ in range(100):
        near = ((h[None] - theta[:, None, :, None, None]).abs() < 1e-2).any(0)
        if not near.any():
            break
        h = h + near.float() * 0.0137
    assert not near.any()
    hard = (h[None] > theta[:, None, :, None, None]).float().mean(dim=(1, 3, 4))
    e = soft_exceedance(h, theta, torch.full((c,), 1e-4))
    # Every |h - theta| >= 1e-2, i.e. |z| >= 100 - 2 u (|h| + |theta|) / 1e-4 > 99 in float32:
    # each sigmoid is within e^-99 of the indicator, and a mean of M = 128 of them adds M u.
    m = 8 * 4 * 4
    torch.testing.assert_close(e, hard, atol=m * math.exp(-99) + 2 * (m + 2) * U32, rtol=0)


def test_soft_exceedance_has_gradient_near_the_threshold() -> None:
    h = torch.tensor([[0.95], [1.05], [5.0]]).requires_grad_()
    e = soft_exceedance(h, torch.tensor([[1.0]]), torch.tensor([0.1]))
    torch.autograd.backward(e.sum())
    assert h.grad is not None
    assert float(h.grad[0, 0]) > 0.5 and float(h.grad[1, 0]) > 0.5
    assert float(h.grad[2, 0]) < 1e-10  # saturated far above: no gradient


def _measured_prior(feats: list[Tensor], theta: Tensor, tau: Tensor) -> TailPrior:
    layers = tuple(
        TailLayerPrior(theta=theta, tau=tau, p=soft_exceedance(f, theta, tau).detach())
        for f in feats
    )
    return TailPrior(layers, source="test", levels=(1.0,))


@FAST
@given(seed=seeds, shift=st.floats(0.05, 2.0))
def test_tar_is_zero_at_the_target_and_grows_away_from_it(seed: int, shift: float) -> None:
    g = _gen(seed)
    feats = [torch.randn(8, 2, 3, 3, generator=g), torch.randn(8, 3, 2, 2, generator=g)]
    theta2 = torch.tensor([[0.5, 1.0], [1.5, 2.0]])
    theta3 = torch.tensor([[0.5, 1.0, 0.0], [1.5, 2.0, 1.0]])
    tau2, tau3 = torch.full((2,), 0.3), torch.full((3,), 0.3)
    prior = TailPrior(
        (
            _measured_prior(feats[:1], theta2, tau2).layers[0],
            _measured_prior(feats[1:], theta3, tau3).layers[0],
        ),
        source="test",
        levels=(1.0, 2.0),
    )
    # Exactly 0: the targets are these very exceedances, from the same computation.
    assert float(tar_loss(feats, prior)) == 0.0
    small = tar_loss([f + shift * 0.5 for f in feats], prior)
    large = tar_loss([f + shift for f in feats], prior)
    assert 0.0 < float(small) < float(large)
    with pytest.raises(ValueError, match="layers"):
        tar_loss(feats[:1], prior)


def _gaussian_grid(mean: Tensor, var: Tensor, m: int) -> Tensor:
    """``[m, C]`` activations at the m mid-quantiles of N(mean_c, var_c): a noiseless sample."""
    q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    z = torch.special.ndtri(q)[:, None]
    grid: Tensor = (mean.double() + z * var.double().sqrt()).float()
    return grid


@pytest.mark.parametrize(
    ("tau_rel", "bound"),
    [
        # Soft vs hard bias: E[sigmoid((Z - k) / t)] = P(Z + t L > k), L logistic, i.e. a
        # Gaussian tail of std ~sqrt(1 + t^2 pi^2 / 3). Exact by quadrature, t = 0.1:
        # e = 0.16255 vs 0.15866 (k=1), 0.02454 vs 0.02275 (k=2): scaled TAR 1.13e-4 and
        # 1.45e-4, mean 1.29e-4 per layer (vs 0.10 when nothing exceeds). t = 0.01: ~1e-8.
        (0.1, 2.0e-4),
        (0.01, 1.0e-5),
    ],
)
def test_tar_is_near_zero_for_gaussian_activations(tau_rel: float, bound: float) -> None:
    bn = nn.BatchNorm2d(4)
    bn.running_mean = torch.tensor([0.0, 1.0, -2.0, 0.5])
    bn.running_var = torch.tensor([1.0, 0.25, 4.0, 2.0])
    prior = extract_bn_prior([bn])
    tail = extract_tail_prior(prior, TARConfig(tau_rel=tau_rel))
    layer = prior.layers[0]
    h = _gaussian_grid(layer.running_mean, layer.running_var + layer.eps, 40_000)
    loss = float(tar_loss([h], tail))
    assert loss < bound
    if tau_rel == 0.1:
        assert loss > 0.5e-4  # the bias is real, and of the size computed above
    # A random sample adds sampling noise ~ 1 / n per (k, c) term.
    g = _gen(0)
    sample = (
        layer.running_mean
        + torch.randn(20_000, 4, generator=g) * (layer.running_var + layer.eps).sqrt()
    )
    assert float(tar_loss([sample], tail)) < bound + 5e-4
    # Heavier or lighter tails are penalized much more.
    assert float(tar_loss([layer.running_mean + (h - layer.running_mean) * 1.5], tail)) > 10 * bound
    assert float(tar_loss([layer.running_mean + (h - layer.running_mean) * 0.5], tail)) > 10 * bound


# ----------------------------------------------------------------------------- definitions


@FAST
@given(
    seed=seeds,
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    p=st.sampled_from([1, 2]),
)
def test_total_variation_matches_its_definition(
    seed: int, n: int, c: int, h: int, w: int, p: Literal[1, 2]
) -> None:
    """The four neighbour differences (right, down, and both diagonals), each summed as a norm
    (p = 2) or a mean absolute value (p = 1), against the definition in float64.

    Error model: each difference rounds once (u |d|); a norm of m of them is then within
    (m + 3) u of its value, a mean likewise; the 4 terms are >= 0, so the sum of them is within
    (m + 6) u of the total, m = the image's size."""
    x = torch.randn(n, c, h, w, generator=_gen(seed)) * 2
    x64 = x.double()

    def cut(t: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
        return t.narrow(-2, rows[0], h - 1 if rows[1] else h).narrow(
            -1, cols[0], w - 1 if cols[1] else w
        )

    diffs = (
        cut(x64, (0, 0), (0, 1)) - cut(x64, (0, 0), (1, 1)),  # right
        cut(x64, (0, 1), (0, 0)) - cut(x64, (1, 1), (0, 0)),  # down
        cut(x64, (1, 1), (0, 1)) - cut(x64, (0, 1), (1, 1)),  # up-right
        cut(x64, (0, 1), (0, 1)) - cut(x64, (1, 1), (1, 1)),  # down-right
    )
    if p == 2:
        ref = sum(float(d.pow(2).sum().sqrt()) for d in diffs)
    else:
        ref = sum(float(d.abs().mean()) if d.numel() else 0.0 for d in diffs)
    got = float(total_variation(x, p=p))
    assert got == pytest.approx(ref, abs=(x.numel() + 6) * U32 * ref)


@FAST
@given(seed=seeds, k=st.integers(1, 3), c=st.integers(1, 3), spatial=st.booleans())
def test_tar_loss_matches_its_definition(seed: int, k: int, c: int, spatial: bool) -> None:
    """``sum_l mean_{k,c} (e - p)^2 / (p (1 - p))`` with ``e`` the soft exceedances it returns,
    against the definition in float64.

    Error model: e is a mean of M sigmoids of x / tau - theta / tau (float32: the argument
    off by 3 u (|x| + |theta|) / tau, the sigmoid, slope <= 1/4, by a quarter of that plus
    2 u), so |e - e_exact| <= d = 0.75 u (|x| + |theta|) / tau + (M + 2) u; a squared gap moves
    by 2 |e - p| d + d^2, over p (1 - p); the means and the sum add (K C + 4) u of the loss."""
    g = _gen(seed)
    shapes = [(6, c, 3, 3) if spatial else (6, c), (4, c + 1, 2, 2)]
    feats = [torch.randn(s, generator=g) * 2 for s in shapes]
    layers = tuple(
        TailLayerPrior(
            theta=torch.randn(k, f.shape[1], generator=g),
            tau=torch.rand(f.shape[1], generator=g) + 0.2,
            p=torch.rand(k, f.shape[1], generator=g) * 0.9 + 0.05,
        )
        for f in feats
    )
    prior = TailPrior(layers, source="test", levels=tuple(float(i) for i in range(k)))
    loss, exceedances = tar_loss_with_exceedances(feats, prior)
    assert torch.equal(loss, tar_loss(feats, prior))
    ref, tol = 0.0, 0.0
    for f, layer, e in zip(feats, layers, exceedances, strict=True):
        assert torch.equal(e, soft_exceedance(f, layer.theta, layer.tau))
        f64, theta, tau = f.double(), layer.theta.double(), layer.tau.double()
        view = (1, f.shape[1]) + (1,) * (f.ndim - 2)
        dims = (0, *range(2, f.ndim))
        e64 = torch.stack(
            [
                torch.sigmoid((f64 - theta[j].view(view)) / tau.view(view)).mean(dims)
                for j in range(k)
            ]
        )
        p = layer.p.double()
        ref += float(((e64 - p).pow(2) / (p * (1 - p))).mean())
        m = f.numel() // f.shape[1]
        arg = float(f.abs().max()) + float(theta.abs().max())
        d = 0.75 * U32 * arg / float(tau.min()) + (m + 2) * U32
        tol += float(((2 * (e64 - p).abs() * d + d * d) / (p * (1 - p))).mean())
    tol += (k * (c + 1) + 4) * U32 * ref
    assert float(loss) == pytest.approx(ref, abs=tol)


def test_losses_reject_bad_inputs_with_their_message() -> None:
    def exact(message: str) -> str:
        return "^" + re.escape(message) + "$"

    with pytest.raises(ValueError, match=exact("relation_matrix: delta must be > 0, got 0.0")):
        relation_matrix(torch.ones(2, 3), delta=0.0)
    with pytest.raises(ValueError, match=exact("rca_loss: batch sizes differ (3 vs 2)")):
        rca_loss(torch.ones(3, 5), torch.ones(2, 5), delta=DELTA)
    with pytest.raises(ValueError, match=exact("rca_adversarial: batch sizes differ (3 vs 2)")):
        rca_adversarial(
            torch.ones(3, 5), torch.ones(2, 5), torch.ones(3, 2), torch.ones(2, 2), delta=DELTA
        )
    with pytest.raises(ValueError, match=exact("total_variation: p must be 1 or 2, got 3")):
        total_variation(torch.ones(1, 1, 2, 2), p=3)  # type: ignore[arg-type]
    h, theta, tau = torch.ones(4, 3), torch.ones(2, 3), torch.ones(3)
    for args in (
        (torch.ones(4), theta, tau),  # h without channels
        (h, torch.ones(3), tau),  # theta not [K, C]
        (h, torch.ones(2, 4), tau),  # theta for 4 channels
        (h, theta, torch.ones(4)),  # tau for 4 channels
    ):
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        message = f"soft_exceedance: expected h [N, C, *], theta [K, C], tau [C]; got {shapes}"
        with pytest.raises(ValueError, match=exact(message)):
            soft_exceedance(*args)
    layer = TailLayerPrior(theta, torch.ones(3), torch.full((2, 3), 0.5))
    two = TailPrior((layer, layer), source="test", levels=(1.0, 2.0))
    with pytest.raises(ValueError, match=exact("tar_loss: 1 feature maps for 2 layers")):
        tar_loss([h], two)


def test_momentum_stats_contract() -> None:
    def exact(message: str) -> str:
        return "^" + re.escape(message) + "$"

    g = _gen(11)
    stats = [(torch.randn(3, generator=g), torch.rand(3, generator=g)) for _ in range(2)]
    prev = [(m + 1.0, v * 2.0) for m, v in stats]
    for momentum in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=exact(f"momentum must be in [0, 1), got {momentum}")):
            momentum_stats(stats, prev, momentum=momentum)
    # Without a previous estimate, or at momentum 0, the current statistics themselves.
    for previous, momentum in ((None, 0.5), (None, 0.0), (prev, 0.0)):
        out = momentum_stats(stats, previous, momentum=momentum)
        for (m, v), (m0, v0) in zip(out, stats, strict=True):
            assert m is m0 and v is v0
    with pytest.raises(ValueError, match=exact("2 current vs 1 previous layer statistics")):
        momentum_stats(stats, prev[:1], momentum=0.5)
    # bn_matching matches the blend with the previous estimate (the same computation).
    bn = nn.BatchNorm2d(3)
    prior = extract_bn_prior([bn, bn])
    assert torch.equal(
        bn_matching(stats, prior, previous=prev, momentum=0.25),
        bn_matching(momentum_stats(stats, prev, momentum=0.25), prior),
    )


def test_prior_tensors_follow_the_activations_device_and_dtype() -> None:
    """The prior's tensors are moved to the activations' device and dtype: float64 activations
    use the float64 values of the float32 prior (an exact conversion, so the results are
    bitwise those of a float64 prior), float32 activations give float32 results from a
    float64 prior, and activations on another device (``meta`` here) get the prior there."""
    g = _gen(12)
    bn = nn.BatchNorm2d(2)
    bn.running_mean, bn.running_var = torch.randn(2, generator=g), torch.rand(2, generator=g) + 1
    prior = extract_bn_prior([bn])
    prior64 = BNPrior(
        tuple(
            BNLayerPrior(layer.running_mean.double(), layer.running_var.double(), layer.eps)
            for layer in prior.layers
        )
    )
    h = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    assert torch.equal(bn_matching([h], prior), bn_matching([h], prior64))
    theta, tau = torch.randn(2, 2, generator=g) / 3, torch.rand(2, generator=g) / 3 + 0.1
    e = soft_exceedance(h, theta, tau)
    assert e.dtype == torch.float64
    assert torch.equal(e, soft_exceedance(h, theta.double(), tau.double()))
    meta = h.to("meta")
    assert bn_matching([meta], prior).device.type == "meta"
    assert soft_exceedance(meta, theta, tau).device.type == "meta"
    tail = TailPrior((TailLayerPrior(theta, tau, torch.full((2, 2), 0.3)),), "test", (1.0, 2.0))
    assert tar_loss([meta], tail).device.type == "meta"
    # ... and float32 activations get float32 results from a float64 prior.
    h32 = h.float()
    tail64 = TailPrior(
        (TailLayerPrior(theta.double(), tau.double(), torch.full((2, 2), 0.3).double()),),
        "test",
        (1.0, 2.0),
    )
    assert bn_matching([h32], prior64).dtype == torch.float32
    assert soft_exceedance(h32, theta.double(), tau.double()).dtype == torch.float32
    assert tar_loss([h32], tail64).dtype == torch.float32


@FAST
@given(
    seed=seeds, k=st.integers(1, 3), c=st.integers(1, 3), which=st.sampled_from(["theta", "tau"])
)
def test_soft_exceedance_learnable_thresholds(seed: int, k: int, c: int, which: str) -> None:
    """With thresholds or temperatures that require grad, the general autograd path: the
    values of the lean path, and the gradients of mean(sigmoid((h - theta) / tau)) for h,
    theta and tau, in float64.

    Error model (float64): the two forms of the argument, x / tau - theta / tau and
    (x - theta) / tau, differ by 3 u (|x| + |theta|) / tau; through the sigmoid (slope <= 1/4,
    its derivatives <= 1/4 too) that moves each term by <= (|x| + |theta|) u / tau, over tau
    (<= 1/tau^2 for tau's gradient) and summed over M terms with weights 1 / M; rounding of
    the sums: M u."""
    g = _gen(seed)
    h = (torch.randn(5, c, 2, 2, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    theta = torch.randn(k, c, generator=g, dtype=torch.float64)
    tau = torch.rand(c, generator=g, dtype=torch.float64) + 0.2
    lean = soft_exceedance(h, theta, tau)
    learn = (theta if which == "theta" else tau).requires_grad_(True)
    general = soft_exceedance(h, theta, tau)
    upstream = torch.randn(k, c, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((general * upstream).sum(), (h, learn))
    view = (1, c, 1, 1)
    sig = [torch.sigmoid((h - theta[j].view(view)) / tau.view(view)) for j in range(k)]
    ref_e = torch.stack([q.mean((0, 2, 3)) for q in sig])
    ref = torch.autograd.grad((ref_e * upstream).sum(), (h, learn))
    m = 5 * 2 * 2
    arg = float(h.detach().abs().max()) + float(theta.detach().abs().max())
    t_min = float(tau.detach().min())
    d = U64 * (arg / t_min + m)
    torch.testing.assert_close(general, lean, atol=d, rtol=0)
    mag = float(upstream.abs().max()) * k
    tol = mag * d * (1 + arg / t_min) / t_min**2
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=0)
