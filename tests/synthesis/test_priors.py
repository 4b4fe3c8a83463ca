"""Feature taps, the BN prior and the tail prior (stars.synthesis.priors)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from stars.config import TARConfig
from stars.synthesis import protocols
from stars.synthesis.priors import (
    BatchStatsTap,
    BNPrior,
    FeatureTap,
    batch_stats,
    extract_bn_prior,
    extract_tail_prior,
)

FAST = settings(max_examples=15, deadline=None)


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
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    torch.testing.assert_close(smean, ref_mean)
    torch.testing.assert_close(svar, ref_var)


def test_batch_stats_of_2d_input() -> None:
    x = torch.randn(7, 3, generator=_gen(0))
    mean, var = batch_stats(x)
    ref_var, ref_mean = torch.var_mean(x, dim=0, unbiased=False)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


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
        # In train mode the BN output is standardized per channel.
        out_mean, _ = batch_stats(tap_out[teacher.bn1])
        w, b = teacher.bn1.weight.detach(), teacher.bn1.bias.detach()
        torch.testing.assert_close(out_mean, b, atol=1e-5, rtol=0)
        del w
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


def test_tap_satisfies_the_protocol() -> None:
    tap: protocols.FeatureTap = FeatureTap([nn.BatchNorm2d(1)])
    assert isinstance(tap, protocols.FeatureTap)


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
    assert g_p == pytest.approx([0.1587, 0.02275, 0.00135], rel=2e-3)
    assert [round(v, 3) for v in g_p[:2]] == [0.159, 0.023]
    assert round(g_p[2], 4) == 0.0013
    assert [round(v, 3) for v in l_p[:2]] == [0.122, 0.030]  # 0.1216 (DESIGN rounds to 0.121)
    assert l_p[0] == pytest.approx(0.5 * math.exp(-math.sqrt(2.0)), rel=1e-6)
    assert round(l_p[2], 4) == 0.0072
    # Same thresholds for both sources: mean + kappa * std.
    layer = prior.layers[0]
    std = torch.sqrt(layer.running_var + layer.eps)
    expected = layer.running_mean[None, :] + torch.tensor([1.0, 2.0, 3.0])[:, None] * std
    torch.testing.assert_close(gauss.layers[0].theta, expected)
    torch.testing.assert_close(lap.layers[0].theta, expected)
    torch.testing.assert_close(gauss.layers[0].tau, 0.1 * std)
    assert gauss.levels == (1.0, 2.0, 3.0)
    assert gauss.layers[0].p.shape == (3, 3)


def test_quantile_thresholds_match_gaussian_kappas() -> None:
    prior = _prior(seed=3)
    kappas = (1.0, 2.0)
    masses = tuple(float(torch.special.ndtr(torch.tensor(-k, dtype=torch.float64))) for k in kappas)
    gauss = extract_tail_prior(prior, TARConfig(kappas=kappas))
    quant = extract_tail_prior(prior, TARConfig(source="quantile", tail_masses=masses))
    torch.testing.assert_close(quant.layers[0].theta, gauss.layers[0].theta)
    torch.testing.assert_close(quant.layers[0].p, gauss.layers[0].p)
    assert quant.levels == masses


def test_student_vth_identity_affine() -> None:
    bn = nn.BatchNorm2d(3, affine=False)
    _bn = nn.BatchNorm2d(3)
    _randomize_bn(_bn, _gen(4))
    bn.running_mean, bn.running_var = _bn.running_mean, _bn.running_var
    prior = extract_bn_prior([bn])
    tail = extract_tail_prior(prior, TARConfig(source="student-vth"), student_vth=1.0)
    layer = prior.layers[0]
    std = torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(tail.layers[0].theta, (layer.running_mean + std)[None, :])
    torch.testing.assert_close(tail.layers[0].p, torch.full((1, 3), 0.158655), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="student_vth"):
        extract_tail_prior(prior, TARConfig(source="student-vth"))


@settings(max_examples=20, deadline=None)
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
    assert 1e-4 * (1 - 1e-6) <= p <= 0.5  # float32 rounding of the clip bound
    # Exact firing mass of gamma * Z + beta > vth for Z ~ N(0, 1).
    z = (vth - beta) / abs(gamma)
    firing = float(torch.special.ndtr(torch.tensor(-z, dtype=torch.float64)))
    assert p == pytest.approx(min(max(firing, 1e-4), 0.5), rel=1e-4, abs=1e-7)
    # Threshold and target are consistent: the Gaussian mass above theta is p.
    std = math.sqrt(2.0 + bn.eps)
    above = float(torch.special.ndtr(torch.tensor(-(theta - 0.7) / std, dtype=torch.float64)))
    assert above == pytest.approx(p, rel=1e-3, abs=1e-6)


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
    torch.testing.assert_close(p, torch.tensor([1e-4, 0.5, 0.5]), rtol=1e-3, atol=0)
