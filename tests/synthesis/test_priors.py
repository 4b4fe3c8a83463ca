"""Feature taps, the BN prior and the tail prior (stars.synthesis.priors)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from error_model import U32, U64, mean_error, variance_error
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import Tensor, nn

from stars.config import TARConfig
from stars.synthesis import protocols
from stars.synthesis.priors import (
    BatchStatsTap,
    BNPrior,
    FeatureTap,
    batch_stats,
    compiled_batch_stats,
    extract_bn_prior,
    extract_tail_prior,
)

FAST = examples(15)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _TinyTeacher(nn.Module):
    """conv-BN-ReLU x2 with a ``bn_layers()`` accessor, like a Teacher."""

    def __init__(self, c: int = 3, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(x)))

    def bn_layers(self) -> list[nn.BatchNorm2d]:
        return [self.bn1, self.bn2]


def _randomize_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, g: torch.Generator) -> None:
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean = torch.randn(c, generator=g)
        bn.running_var = torch.rand(c, generator=g) + 0.5
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))


# ----------------------------------------------------------------------------- taps


@FAST
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 5),
    c=st.integers(1, 4),
    hw=st.integers(1, 5),
)
def test_tap_statistics_equal_var_mean(seed: int, n: int, c: int, hw: int) -> None:
    g = _gen(seed)
    bn = nn.BatchNorm2d(c).eval()
    x = torch.randn(n, c, hw, hw, generator=g) * 3 + 1
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    with FeatureTap([bn]) as tap, BatchStatsTap([bn]) as stats:
        bn(x)
        mean, var = batch_stats(tap[bn])
        assert torch.equal(tap[bn], x)
        smean, svar = stats[bn]
    # Bitwise: batch_stats is torch.var_mean over the same dims of the same tensor.
    assert torch.equal(mean, ref_mean)
    assert torch.equal(var, ref_var)
    assert torch.equal(smean, ref_mean)
    assert torch.equal(svar, ref_var)


@FAST
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 5),
    c=st.integers(1, 4),
    hw=st.integers(1, 5),
    scale=st.floats(0.01, 100.0),
    offset=st.floats(-10.0, 10.0),
)
def test_compiled_batch_stats_agree_with_eager(
    seed: int, n: int, c: int, hw: int, scale: float, offset: float
) -> None:
    """``compile: true``'s statistics (inductor's reduction) against ATen's ``var_mean``,
    values and input gradients.

    Error model (tests/error_model.py): each computation of the mean of ``m = n hw^2`` values
    ``|x| <= a`` is within ``mean_error(m, a)`` of the exact mean, of the biased variance
    within ``variance_error(m, a)``; two computations within twice that. The gradient of
    ``sum(mean) + sum(var)`` is ``(1 + 2 (x_i - mean)) / m``: the mean's error enters doubled
    and scaled by ``1 / m`` (``2 u a``), the subtraction, the doubling, the sum and the
    division add at most ``u (1 + 4 a)`` each, so per computation
    ``B = 2 u a + 4 u (1 + 4 a) / m``, and two computations differ by at most ``2 B``."""
    g = _gen(seed)
    x = torch.randn(n, c, hw, hw, generator=g) * scale + offset
    a = float(x.abs().max())
    m = n * hw * hw
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    mean_a, var_a = batch_stats(xa)
    mean_b, var_b = compiled_batch_stats(xb)
    assert (mean_a - mean_b).abs().max() <= 2 * mean_error(m, a)
    assert (var_a - var_b).abs().max() <= 2 * variance_error(m, a)
    torch.autograd.backward(mean_a.sum() + var_a.sum())
    torch.autograd.backward(mean_b.sum() + var_b.sum())
    assert xa.grad is not None and xb.grad is not None
    bound = 2 * U32 * a + 4 * U32 * (1 + 4 * a) / m
    assert (xa.grad - xb.grad).abs().max() <= 2 * bound


def test_batch_stats_of_2d_input() -> None:
    x = torch.randn(7, 3, generator=_gen(0))
    mean, var = batch_stats(x)
    ref_var, ref_mean = torch.var_mean(x, dim=0, unbiased=False)
    assert torch.equal(mean, ref_mean)  # the same kernel on the same values
    assert torch.equal(var, ref_var)


def test_tap_captures_input_and_output_in_order_and_keeps_graph() -> None:
    teacher = _TinyTeacher().train()
    x = torch.randn(2, 3, 4, 4, generator=_gen(1), requires_grad=True)
    with (
        FeatureTap(teacher.bn_layers()) as tap_in,
        FeatureTap(teacher.bn_layers(), capture="output") as tap_out,
    ):
        teacher(x)
        assert list(tap_in) == teacher.bn_layers()
        assert len(tap_in) == 2
        assert tap_in[teacher.bn1].shape == tap_out[teacher.bn1].shape == (2, 4, 4, 4)
        # In train mode the BN output is standardized per channel: its mean is beta. float32:
        # m = 32 standardized values, each |x_hat| <= sqrt(m) and off by a few u, times gamma
        # plus beta; their mean is off by <= (m + 4) u (|gamma| sqrt(m) + |beta|).
        out_mean, _ = batch_stats(tap_out[teacher.bn1])
        w, b = teacher.bn1.weight.detach(), teacher.bn1.bias.detach()
        m = 2 * 4 * 4
        tol = (m + 4) * U32 * (float(w.abs().max()) * math.sqrt(m) + float(b.abs().max()))
        torch.testing.assert_close(out_mean, b, atol=tol, rtol=0)
        torch.autograd.backward(torch.stack([v.sum() for v in tap_in.values()]).sum())
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_tap_removes_hooks_and_drops_tensors_on_exit() -> None:
    teacher = _TinyTeacher()
    bns = teacher.bn_layers()
    tap = FeatureTap(bns)
    with tap:
        assert all(len(bn._forward_hooks) == 1 for bn in bns)
        assert tap.active
        teacher(torch.randn(2, 3, 4, 4))
        assert len(tap) == 2
    assert all(len(bn._forward_hooks) == 0 for bn in bns)
    assert not tap.active
    assert len(tap) == 0
    with pytest.raises(KeyError):
        tap[bns[0]]
    # After exit, forwards are not recorded.
    teacher(torch.randn(2, 3, 4, 4))
    assert len(tap) == 0


@pytest.mark.parametrize("tap_cls", [FeatureTap, BatchStatsTap])
def test_tap_removes_hooks_when_the_body_raises(tap_cls: type[FeatureTap]) -> None:
    teacher = _TinyTeacher()
    bns = teacher.bn_layers()
    tap = tap_cls(bns)

    def forward_then_fail() -> None:
        with tap:
            teacher(torch.randn(2, 3, 4, 4))
            assert len(tap) == 2
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        forward_then_fail()
    assert all(len(bn._forward_hooks) == 0 for bn in bns)
    assert len(tap) == 0


def test_tap_leaves_foreign_hooks_and_cannot_be_entered_twice() -> None:
    bn = nn.BatchNorm2d(2)
    calls: list[int] = []
    handle = bn.register_forward_hook(lambda m, a, o: calls.append(1))
    tap = FeatureTap([bn])
    with tap:
        with pytest.raises(RuntimeError, match="already active"), tap:
            pass
        bn(torch.randn(2, 2, 1, 1))
    assert len(bn._forward_hooks) == 1  # only ours removed
    assert calls == [1]
    handle.remove()
    with pytest.raises(ValueError, match="twice"):
        FeatureTap([bn, bn])


def test_taps_satisfy_the_protocol() -> None:
    bn = nn.BatchNorm2d(1)
    tap: protocols.Tap[torch.Tensor] = FeatureTap([bn])
    stats: protocols.Tap[tuple[torch.Tensor, torch.Tensor]] = BatchStatsTap([bn])
    assert isinstance(tap, protocols.Tap)
    assert isinstance(stats, protocols.Tap)


def test_tap_last_call_wins() -> None:
    bn = nn.BatchNorm2d(2)
    a, b = torch.randn(2, 2, 1, 1), torch.randn(3, 2, 1, 1)
    with FeatureTap([bn], detach=True) as tap:
        bn(a)
        bn(b)
        assert torch.equal(tap[bn], b)


# ----------------------------------------------------------------------------- BN prior


def test_extract_bn_prior_sources_agree_and_are_frozen_clones() -> None:
    teacher = _TinyTeacher()
    g = _gen(2)
    for bn in teacher.bn_layers():
        _randomize_bn(bn, g)
    from_teacher = extract_bn_prior(teacher)
    from_list = extract_bn_prior(teacher.bn_layers())
    plain = nn.Sequential(teacher.conv1, teacher.bn1, teacher.conv2, teacher.bn2)
    from_module = extract_bn_prior(plain)
    assert isinstance(from_teacher, BNPrior)
    for prior in (from_list, from_module):
        assert len(prior) == 2
        for a, b in zip(prior.layers, from_teacher.layers, strict=True):
            assert torch.equal(a.running_mean, b.running_mean)
            assert torch.equal(a.running_var, b.running_var)
            assert a.eps == b.eps
    before = from_teacher.layers[0].running_mean.clone()
    teacher.bn1.running_mean = torch.full((4,), 5.0)
    assert torch.equal(from_teacher.layers[0].running_mean, before)
    assert not from_teacher.layers[0].running_mean.requires_grad
    assert from_teacher.layers[0].weight is not None
    assert not from_teacher.layers[0].weight.requires_grad


def test_extract_bn_prior_rejects_missing_statistics() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        extract_bn_prior(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="running statistics"):
        extract_bn_prior([nn.BatchNorm2d(2, track_running_stats=False)])


# ----------------------------------------------------------------------------- tail prior


def _prior(c: int = 3, seed: int = 0) -> BNPrior:
    bn = nn.BatchNorm2d(c)
    _randomize_bn(bn, _gen(seed))
    return extract_bn_prior([bn])


def test_gaussian_and_laplace_targets() -> None:
    prior = _prior()
    gauss = extract_tail_prior(prior, TARConfig(kappas=(1.0, 2.0, 3.0)))
    lap = extract_tail_prior(prior, TARConfig(kappas=(1.0, 2.0, 3.0), source="laplace-bn"))
    g_p = gauss.layers[0].p[:, 0].tolist()
    l_p = lap.layers[0].p[:, 0].tolist()
    # The targets are float64 values rounded once to float32 (relative u), against float64
    # references (erfc and exp: a few u64).
    rel = U32 + 8 * U64
    exact_g = [0.5 * math.erfc(k / math.sqrt(2.0)) for k in (1.0, 2.0, 3.0)]
    assert g_p == pytest.approx(exact_g, rel=rel)
    assert [round(v, 3) for v in g_p[:2]] == [0.159, 0.023]
    assert round(g_p[2], 4) == 0.0013
    assert [round(v, 3) for v in l_p[:2]] == [0.122, 0.030]  # 0.1216 (DESIGN rounds to 0.121)
    exact_l = [0.5 * math.exp(-math.sqrt(2.0) * k) for k in (1.0, 2.0, 3.0)]
    assert l_p == pytest.approx(exact_l, rel=rel)
    assert round(l_p[2], 4) == 0.0072
    # Same thresholds for both sources: mean + kappa * std, computed in float64 from the
    # float32 statistics and rounded once; the float64 reference rounds a few u64 more.
    layer = prior.layers[0]
    std = torch.sqrt(layer.running_var.double() + layer.eps)
    kappas = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[:, None]
    expected = layer.running_mean.double()[None, :] + kappas * std
    for theta in (gauss.layers[0].theta, lap.layers[0].theta):
        torch.testing.assert_close(theta.double(), expected, rtol=rel, atol=0)
    torch.testing.assert_close(gauss.layers[0].tau.double(), 0.1 * std, rtol=rel, atol=0)
    assert gauss.levels == (1.0, 2.0, 3.0)
    assert gauss.layers[0].p.shape == (3, 3)


def test_quantile_thresholds_match_gaussian_kappas() -> None:
    prior = _prior(seed=3)
    kappas = (1.0, 2.0)
    masses = tuple(float(torch.special.ndtr(torch.tensor(-k, dtype=torch.float64))) for k in kappas)
    gauss = extract_tail_prior(prior, TARConfig(kappas=kappas))
    quant = extract_tail_prior(prior, TARConfig(source="quantile", tail_masses=masses))
    # float64 z = ndtri(1 - ndtr(-kappa)) is kappa up to ~1e-14 (1 - q rounds by u64, divided
    # by the density); theta = mu + z s then rounds once to float32 on both sides, so the two
    # may fall one float32 step apart (<= 2 u relative).
    torch.testing.assert_close(quant.layers[0].theta, gauss.layers[0].theta, rtol=2 * U32, atol=0)
    # Bitwise: both are float32(ndtr(-kappa)) of the same float64 value.
    assert torch.equal(quant.layers[0].p, gauss.layers[0].p)
    assert quant.levels == masses


def test_student_vth_identity_affine() -> None:
    bn = nn.BatchNorm2d(3, affine=False)
    _bn = nn.BatchNorm2d(3)
    _randomize_bn(_bn, _gen(4))
    bn.running_mean, bn.running_var = _bn.running_mean, _bn.running_var
    prior = extract_bn_prior([bn])
    tail = extract_tail_prior(prior, TARConfig(source="student-vth"), student_vth=1.0)
    layer = prior.layers[0]
    # float64 from the float32 statistics, rounded once (u), against a float64 reference.
    rel = U32 + 8 * U64
    std = torch.sqrt(layer.running_var.double() + layer.eps)
    theta = (layer.running_mean.double() + std)[None, :]
    torch.testing.assert_close(tail.layers[0].theta.double(), theta, rtol=rel, atol=0)
    p = torch.full((1, 3), 0.5 * math.erfc(1 / math.sqrt(2.0)), dtype=torch.float64)
    torch.testing.assert_close(tail.layers[0].p.double(), p, rtol=rel, atol=0)
    with pytest.raises(ValueError, match="student_vth"):
        extract_tail_prior(prior, TARConfig(source="student-vth"))


@examples(20)
@given(
    gamma=st.floats(-3.0, 3.0).filter(lambda v: abs(v) > 0.2),
    beta=st.floats(-2.0, 2.0),
    vth=st.floats(0.25, 2.0),
)
def test_student_vth_target_is_the_firing_mass(gamma: float, beta: float, vth: float) -> None:
    """Gaussian BN inputs through the layer's affine fire above v_th with mass p."""
    bn = nn.BatchNorm2d(1)
    with torch.no_grad():
        bn.running_mean = torch.full((1,), 0.7)
        bn.running_var = torch.full((1,), 2.0)
        bn.weight.fill_(gamma)
        bn.bias.fill_(beta)
    tail = extract_tail_prior(
        extract_bn_prior([bn]), TARConfig(source="student-vth"), student_vth=vth
    )
    p = float(tail.layers[0].p[0, 0])
    theta = float(tail.layers[0].theta[0, 0])
    assert 1e-4 * (1 - U32) <= p <= 0.5  # float32 rounding of the clip bound
    # Exact firing mass of gamma * Z + beta > vth for Z ~ N(0, 1), with gamma and beta as the
    # layer holds them (float32): the float64 computations agree to a few u64, then p is
    # rounded once to float32 (u relative).
    g32, b32 = float(bn.weight.detach()[0]), float(bn.bias.detach()[0])
    z = (vth - b32) / abs(g32)
    firing = float(torch.special.ndtr(torch.tensor(-z, dtype=torch.float64)))
    assert p == pytest.approx(min(max(firing, 1e-4), 0.5), rel=U32 + 64 * U64)
    # Threshold and target are consistent: the Gaussian mass above theta is p. theta was
    # rounded to float32 (|d theta| <= u |theta|), which moves that mass by at most
    # phi(.) u |theta| / std with the density phi <= 0.4; p itself is rounded by u p.
    std = math.sqrt(2.0 + bn.eps)
    above = float(torch.special.ndtr(torch.tensor(-(theta - 0.7) / std, dtype=torch.float64)))
    assert above == pytest.approx(p, abs=0.4 * U32 * abs(theta) / std + 2 * U32 * p)


def test_student_vth_guards_dead_and_saturated_channels() -> None:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.0, 0.0, 1e-12]))
        bn.bias.copy_(torch.tensor([0.0, 2.0, 1.0]))
    tail = extract_tail_prior(
        extract_bn_prior([bn]), TARConfig(source="student-vth"), student_vth=1.0
    )
    p = tail.layers[0].p[0]
    theta = tail.layers[0].theta[0]
    assert torch.isfinite(theta).all()
    # 1e-4 is ndtr(ndtri(1e-4)) in float64 (a few u64 off) clipped and rounded to float32;
    # 0.5 is exact (ndtr(0)).
    torch.testing.assert_close(p, torch.tensor([1e-4, 0.5, 0.5]), rtol=U32 + 64 * U64, atol=0)


def _exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_batch_stats_tap_keeps_or_drops_the_graph() -> None:
    bn = nn.BatchNorm2d(2)
    x = torch.randn(3, 2, 2, 2, generator=_gen(5), requires_grad=True)
    with BatchStatsTap([bn]) as keep, BatchStatsTap([bn], detach=True) as drop:
        bn(x)
        assert all(t.requires_grad for t in keep[bn])
        assert not any(t.requires_grad for t in drop[bn])
        assert all(torch.equal(a, b) for a, b in zip(keep[bn], drop[bn], strict=True))


def test_tail_prior_records_its_source_and_levels() -> None:
    prior = _prior(seed=6)
    layer = prior.layers[0]
    cases = {
        "gaussian-bn": TARConfig(kappas=(1.5,)),
        "laplace-bn": TARConfig(kappas=(1.5,), source="laplace-bn"),
        "quantile": TARConfig(source="quantile", tail_masses=(0.1, 0.2)),
        "student-vth": TARConfig(source="student-vth"),
    }
    for source, cfg in cases.items():
        tail = extract_tail_prior(prior, cfg, student_vth=0.75)
        assert tail.source == source
        assert tail.levels == {"quantile": (0.1, 0.2), "student-vth": (0.75,)}.get(source, (1.5,))
    # kappa 0 is allowed (the threshold is the mean, the target 1/2); kappas come from a
    # validated config, which refuses 0 itself, so the function is called with a copy.
    zero = TARConfig().model_copy(update={"kappas": (0.0, 0.5)})
    tail = extract_tail_prior(prior, zero)
    assert tail.levels == (0.0, 0.5)
    assert torch.equal(tail.layers[0].theta[0], layer.running_mean)  # mu + 0 * s, exactly
    exact_p = [0.5, 0.5 * math.erfc(0.5 / math.sqrt(2.0))]
    assert tail.layers[0].p[:, 0].tolist() == pytest.approx(exact_p, rel=U32 + 8 * U64)
    negative = TARConfig().model_copy(update={"kappas": (1.0, -1.0)})
    with pytest.raises(ValueError, match=_exact("kappas must be >= 0, got (1.0, -1.0)")):
        extract_tail_prior(prior, negative)
    message = "source 'student-vth' needs student_vth (the student's v_threshold)"
    with pytest.raises(ValueError, match=_exact(message)):
        extract_tail_prior(prior, TARConfig(source="student-vth"))
    bogus = TARConfig().model_copy(update={"source": "bogus"})
    with pytest.raises(ValueError, match=_exact("unknown tail source 'bogus'")):
        extract_tail_prior(prior, bogus)


def test_student_vth_clips_to_the_documented_threshold() -> None:
    """A dead channel (gamma = 0, beta below v_th) gets the 1e-4 tail: theta = mu + s z_max
    with z_max = Phi^-1(1 - 1e-4), in float64 then rounded once to float32 (u)."""
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_mean = torch.tensor([0.5, -1.0])
        bn.running_var = torch.tensor([2.0, 0.5])
        bn.weight.zero_()
        bn.bias.zero_()
    tail = extract_tail_prior(
        extract_bn_prior([bn]), TARConfig(source="student-vth"), student_vth=1.0
    )
    z_max = -float(torch.special.ndtri(torch.tensor(1e-4, dtype=torch.float64)))
    s = torch.sqrt(torch.tensor([2.0, 0.5], dtype=torch.float64) + bn.eps)
    theta = torch.tensor([0.5, -1.0], dtype=torch.float64) + s * z_max
    torch.testing.assert_close(tail.layers[0].theta[0].double(), theta, rtol=U32 + 64 * U64, atol=0)


@pytest.mark.parametrize("source", ["gaussian-bn", "laplace-bn", "quantile", "student-vth"])
def test_tail_prior_is_float32_on_the_bn_priors_device(source: str) -> None:
    """As documented: float32 tensors on the prior's device (``meta`` here: a device other
    than the CPU that needs no hardware)."""
    prior = extract_bn_prior([nn.BatchNorm2d(3)]).to("meta")
    tail = extract_tail_prior(prior, TARConfig(source=source), student_vth=1.0)
    for t in (tail.layers[0].theta, tail.layers[0].tau, tail.layers[0].p):
        assert t.device.type == "meta"
        assert t.dtype == torch.float32


def test_prior_copies_move_every_tensor_and_keep_the_rest() -> None:
    bn = nn.BatchNorm2d(2, eps=1e-3)
    _randomize_bn(bn, _gen(7))
    prior = extract_bn_prior([bn])
    layer = prior.layers[0]
    assert layer.eps == 1e-3
    assert layer.num_channels == 2
    assert torch.equal(layer.std, torch.sqrt(layer.running_var + 1e-3))
    assert (
        prior.running_means[0] is layer.running_mean and prior.running_vars[0] is layer.running_var
    )
    meta = prior.to("meta")
    assert len(meta) == 1
    moved = meta.layers[0]
    for name in ("running_mean", "running_var", "weight", "bias"):
        t = getattr(moved, name)
        assert t.device.type == "meta" and t.shape == (2,)
    assert moved.eps == 1e-3
    bare = extract_bn_prior([nn.BatchNorm2d(2, affine=False)]).to("meta").layers[0]
    assert bare.weight is None and bare.bias is None
    tail = extract_tail_prior(prior, TARConfig(kappas=(1.0, 2.0)))
    tail_meta = tail.to("meta")
    assert (tail_meta.source, tail_meta.levels, len(tail_meta)) == (tail.source, tail.levels, 1)
    for name in ("theta", "tau", "p"):
        t, ref = getattr(tail_meta.layers[0], name), getattr(tail.layers[0], name)
        assert t.device.type == "meta" and t.shape == ref.shape


class _Stats(nn.Module):
    """Running statistics without an ``eps`` (extract_bn_prior then assumes BatchNorm's 1e-5)."""

    def __init__(self, var: bool = True) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(2))
        if var:
            self.register_buffer("running_var", torch.ones(2))


def test_bn_prior_and_tap_errors_say_what_is_wrong() -> None:
    assert extract_bn_prior([_Stats()]).layers[0].eps == 1e-5
    with pytest.raises(ValueError, match=_exact("extract_bn_prior: no BatchNorm layer found")):
        extract_bn_prior(nn.Linear(2, 2))
    message = "extract_bn_prior: layer 0 (_Stats) has no running statistics"
    with pytest.raises(ValueError, match=_exact(message)):
        extract_bn_prior([_Stats(var=False)])
    with pytest.raises(
        ValueError, match=_exact("batch_stats expects [N, C, *] activations, got shape (3,)")
    ):
        batch_stats(torch.ones(3))
    with pytest.raises(ValueError, match=_exact("capture must be 'input' or 'output', got 'both'")):
        FeatureTap([nn.BatchNorm2d(1)], capture="both")  # type: ignore[arg-type]
    bn = nn.BatchNorm2d(2)
    with pytest.raises(ValueError, match=_exact("FeatureTap got the same module twice")):
        FeatureTap([bn, bn])
    tap = FeatureTap([bn])
    message = "this tap is already active; a tap cannot be entered twice"
    with tap, pytest.raises(RuntimeError, match=_exact(message)), tap:
        pass
    other = nn.BatchNorm2d(2)
    x = torch.randn(2, 2, 1, 1, requires_grad=True)
    with FeatureTap([bn]) as keep, FeatureTap([bn], detach=True) as drop:
        bn(x)
        assert bn in keep and other not in keep
        assert keep[bn].requires_grad and not drop[bn].requires_grad
        message = (
            "BatchNorm2d has not been captured: it is not hooked by this tap, "
            "did not run in the forward pass, or the block has exited"
        )
        with pytest.raises(KeyError, match=re.escape(message)):
            keep[other]
    # capture="input" needs a positional input
    message = "FeatureTap(capture='input') needs a module called with a positional input"
    with FeatureTap([bn]), pytest.raises(TypeError, match=_exact(message)):
        bn(input=x)


class _Pair(nn.Module):
    """Two BN layers of which ``bn_layers()`` names only the second."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.BatchNorm2d(2), nn.BatchNorm2d(3)

    def bn_layers(self) -> list[nn.Module]:
        return [self.second]


class _Odd(nn.Module):
    """A running variance that is not a tensor: no statistics."""

    running_var = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(2))


class _Twice(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


def test_bn_layers_accessor_and_non_tensor_attributes() -> None:
    prior = extract_bn_prior(_Pair())
    assert [layer.num_channels for layer in prior.layers] == [3]  # the accessor, not a scan
    with pytest.raises(ValueError, match="has no running statistics"):
        extract_bn_prior([_Odd()])
    twice = _Twice()
    message = "FeatureTap captures tensors; the hooked module's output is tuple"
    with FeatureTap([twice], capture="output"), pytest.raises(TypeError, match=_exact(message)):
        twice(torch.ones(1))
