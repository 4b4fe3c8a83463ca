"""Synthesis losses (stars.synthesis.losses): property tests."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
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
    total_variation,
)
from stars.synthesis.priors import (
    FeatureTap,
    TailLayerPrior,
    TailPrior,
    batch_stats,
    extract_bn_prior,
    extract_tail_prior,
)

FAST = settings(max_examples=15, deadline=None)
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
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-5)
    torch.autograd.backward(loss)
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    # Shifting the batch moves it away from the prior.
    shifted = bn_matching([x.detach() + 1.0], prior)
    assert float(shifted) == pytest.approx(math.sqrt(c), rel=1e-4)


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
    ref = sum(
        float(torch.linalg.vector_norm(f.mean((0, 2, 3)) - layer.running_mean))
        + float(torch.linalg.vector_norm(f.var((0, 2, 3), unbiased=False) - layer.running_var))
        for f, layer in zip(feats, prior.layers, strict=True)
    )
    assert float(bn_matching(feats, prior)) == pytest.approx(ref, rel=1e-5)
    stats = [batch_stats(f) for f in feats]
    assert float(bn_matching(stats, prior)) == pytest.approx(ref, rel=1e-5)
    # Momentum with previous == current changes nothing; momentum_stats is the blend.
    same = bn_matching(feats, prior, previous=stats, momentum=0.9)
    assert float(same) == pytest.approx(ref, rel=1e-5)
    prev = [(m + 1.0, v * 2.0) for m, v in stats]
    blended = momentum_stats(stats, prev, momentum=0.25)
    for (bm, bv), (m, v), (pm, pv) in zip(blended, stats, prev, strict=True):
        torch.testing.assert_close(bm, 0.25 * pm + 0.75 * m)
        torch.testing.assert_close(bv, 0.25 * pv + 0.75 * v)
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
    # Reference: -mean(KL * mask) * T^2 with torch's kl_div.
    kl = F.kl_div(
        F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="none"
    ).sum(1)
    ref = -(kl * agree.float()).mean() * temperature**2
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert float(loss) <= 0.0
    # Changing the student's logits on disagreeing samples (keeping them disagreeing)
    # does not change the loss.
    s2 = s.clone()
    for i in torch.nonzero(~agree).flatten().tolist():
        noise = torch.randn(5, generator=g)
        noise[t[i].argmax()] = -100.0
        s2[i] = noise
    torch.testing.assert_close(adversarial_masked_kl(t, s2, temperature=temperature), loss)
    assert float(adversarial_masked_kl(t, t, temperature=temperature)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_dafl_terms() -> None:
    f = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    assert float(dafl_activation(f)) == pytest.approx(-1.5)
    k = 10
    uniform = torch.zeros(4, k)
    assert float(dafl_information_entropy(uniform)) == pytest.approx(-math.log10(k), rel=1e-6)
    assert float(dafl_information_entropy(uniform, base=math.e)) == pytest.approx(-math.log(k))
    one_class = torch.zeros(4, k)
    one_class[:, 3] = 1000.0
    collapsed = dafl_information_entropy(one_class)
    assert float(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(collapsed)
    # Balanced but confident predictions reach the minimum too.
    balanced = torch.full((k, k), -1000.0).fill_diagonal_(1000.0)
    assert float(dafl_information_entropy(balanced)) == pytest.approx(-math.log10(k), rel=1e-6)
    logits = torch.randn(8, k, generator=_gen(1), requires_grad=True)
    value = dafl_information_entropy(logits)
    assert -math.log10(k) - 1e-6 <= float(value.detach()) <= 0.0
    torch.autograd.backward(value)
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_dfad_l1() -> None:
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    s = torch.tensor([[0.0, 2.0], [3.0, 6.0]])
    assert float(dfad_l1(t, s)) == pytest.approx(0.75)
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
    assert float(total_variation(x, p=1)) == pytest.approx(0.5 + 0.5 + 0.0 + 1.0)
    assert float(total_variation(x, p=2)) == pytest.approx(1.0 + 1.0 + 0.0 + 1.0)
    y = torch.randn(2, 3, 4, 4, generator=_gen(2))
    assert float(total_variation(y)) > 0
    assert float(image_l2(y)) == pytest.approx(float(y.pow(2).sum().sqrt()), rel=1e-6)


# ----------------------------------------------------------------------------- RCA


def _features(seed: int, b: int, d: int) -> Tensor:
    return torch.randn(b, d, generator=_gen(seed))


@FAST
@given(seed=seeds, b=st.integers(1, 8), d=st.integers(1, 6))
def test_relation_matrix_is_symmetric_with_unit_diagonal(seed: int, b: int, d: int) -> None:
    z = _features(seed, b, d) * 3
    r = relation_matrix(z, delta=DELTA)
    assert r.shape == (b, b)
    torch.testing.assert_close(r, r.T)
    sq = z.pow(2).sum(1)
    torch.testing.assert_close(torch.diagonal(r), sq / (sq + DELTA))
    assert (r.abs() <= 1.0 + 1e-6).all()
    # Flattening beyond dim 1.
    torch.testing.assert_close(relation_matrix(z.view(b, d, 1, 1), delta=DELTA), r)


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
    g = _gen(seed + 1)
    scales = scale * (0.5 + torch.rand(b, 1, generator=g))
    zs = z * scales
    q_min = float(torch.minimum(z.pow(2).sum(1), zs.pow(2).sum(1)).min())
    bound = (DELTA / q_min) ** 2
    assert float(rca_loss(z, zs, delta=DELTA)) <= 1.01 * bound + 1e-10
    if q_min > 100 * DELTA:
        assert float(rca_loss(z, zs, delta=DELTA)) <= 1e-4


@FAST
@given(seed=seeds, b=st.integers(1, 8), dt=st.integers(1, 6), ds=st.integers(1, 6))
def test_rca_is_bounded_and_permutation_invariant(seed: int, b: int, dt: int, ds: int) -> None:
    zt, zs = _features(seed, b, dt), _features(seed + 7, b, ds)
    loss = rca_loss(zt, zs, delta=DELTA)
    assert 0.0 <= float(loss) <= 4.0
    perm = torch.randperm(b, generator=_gen(seed + 3))
    torch.testing.assert_close(rca_loss(zt[perm], zs[perm], delta=DELTA), loss)
    # The bound is reached by opposite relations.
    v = torch.tensor([[1.0], [-1.0]])
    anti = rca_loss(v, torch.tensor([[1.0], [1.0]]), delta=1e-12)
    assert float(anti) == pytest.approx(2.0, rel=1e-5)  # 2 of 4 entries differ by 2


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
    assert -4.0 <= float(loss) <= 0.0
    if int(agree.sum()) >= 2:
        ref = -rca_loss(zt[agree], zs[agree], delta=DELTA)
        torch.testing.assert_close(loss, ref)
    else:
        assert float(loss) == 0.0
    # Changing the features of disagreeing samples changes nothing.
    zs2 = zs.clone()
    zs2[~agree] = torch.randn(int((~agree).sum()), 5, generator=g) * 10
    torch.testing.assert_close(rca_adversarial(zt, zs2, t_logits, s_logits, delta=DELTA), loss)


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
    shifted = soft_exceedance(h + torch.rand(h.shape, generator=g), theta, taus)
    assert (shifted >= e - 1e-6).all()
    # [N, C] activations work the same.
    flat = h.permute(0, 2, 3, 1).reshape(-1, c)
    torch.testing.assert_close(soft_exceedance(flat, theta, taus), e)


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
    torch.testing.assert_close(fast, ref)
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
    torch.testing.assert_close(e, hard, atol=1e-4, rtol=0)


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
    assert float(tar_loss(feats, prior)) == pytest.approx(0.0, abs=1e-10)
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
