"""Student losses (stars.distill.losses): property tests."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stars.distill.losses import kd_loss, student_rca, student_rca_per_step, tet_kd_loss
from stars.synthesis.losses import rca_loss

FAST = settings(max_examples=20, deadline=None)
seeds = st.integers(0, 2**16)
temperatures = st.sampled_from([1.0, 4.0, 20.0])


def _logits(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@FAST
@given(seed=seeds, n=st.integers(1, 6), k=st.integers(2, 10), temperature=temperatures)
def test_kd_is_nonnegative_zero_at_equality_and_matches_kl_div(
    seed: int, n: int, k: int, temperature: float
) -> None:
    s, t = _logits(seed, n, k), _logits(seed + 1, n, k)
    loss = kd_loss(s, t, temperature=temperature)
    # Error model: each float32 log-probability log_softmax(z) with z = logits / tau is off by
    # at most ~4 eps (|z|_max + log k + 1) (the max subtraction, exp-sum and log each round
    # once per term); KL = sum_k p (log p_T - log p_S) weighs two of them by p (summing to 1),
    # so it is off by <= 8 eps (|z|_max + log k + 1), and tau^2 scales that. (A fixed 2e-7 tau^2
    # failed once at tau = 20: 5.3070197 vs 5.3069377.)
    eps = torch.finfo(torch.float32).eps
    z_max = max(float(s.abs().max()), float(t.abs().max())) / temperature
    tol = 8 * eps * (z_max + math.log(k) + 1) * temperature**2
    assert float(loss) >= -tol
    assert float(kd_loss(t, t, temperature=temperature)) == pytest.approx(0.0, abs=tol)
    s64, t64 = s.double(), t.double()
    exact = kd_loss(s64, t64, temperature=temperature)
    assert float(exact) >= 0.0
    ref = (
        F.kl_div(
            F.log_softmax(s64 / temperature, dim=1),
            F.softmax(t64 / temperature, dim=1),
            reduction="batchmean",
        )
        * temperature**2
    )
    torch.testing.assert_close(exact, ref, atol=1e-12, rtol=1e-9)
    assert float(loss) == pytest.approx(float(exact), abs=tol, rel=0)
    # Invariant to adding a constant to either side's logits (softmax shift).
    shifted = kd_loss(s64 + 2.0, t64 - 1.0, temperature=temperature)
    torch.testing.assert_close(shifted, exact, atol=1e-12, rtol=1e-9)


def test_kd_gradient_flows_to_the_student_only_through_its_logits() -> None:
    s = _logits(0, 4, 5).requires_grad_()
    t = _logits(1, 4, 5)
    torch.autograd.backward(kd_loss(s, t, temperature=4.0))
    assert s.grad is not None
    assert torch.isfinite(s.grad).all()
    # d/ds [tau^2 KL] = tau * (p_S - p_T) / N.
    expected = 4.0 * (F.softmax(s.detach() / 4.0, 1) - F.softmax(t / 4.0, 1)) / 4
    torch.testing.assert_close(s.grad, expected, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="shapes"):
        kd_loss(s, t[:2], temperature=1.0)


@FAST
@given(seed=seeds, steps=st.integers(1, 4), n=st.integers(1, 4), temperature=temperatures)
def test_tet_kd_is_the_mean_of_per_step_kd(
    seed: int, steps: int, n: int, temperature: float
) -> None:
    s_seq, t = _logits(seed, steps, n, 5), _logits(seed + 1, n, 5)
    loss = tet_kd_loss(s_seq, t, temperature=temperature)
    ref = torch.stack([kd_loss(s_seq[i], t, temperature=temperature) for i in range(steps)]).mean()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    same = tet_kd_loss(t.expand(steps, -1, -1), t, temperature=temperature)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


@FAST
@given(seed=seeds, steps=st.integers(1, 4), n=st.integers(1, 6))
def test_student_rca_averages_over_time(seed: int, steps: int, n: int) -> None:
    s_seq = _logits(seed, steps, n, 6).abs()
    t = _logits(seed + 1, n, 3)
    loss = student_rca(s_seq, t, delta=1e-4)
    torch.testing.assert_close(loss, rca_loss(t, s_seq.mean(0), delta=1e-4))
    assert 0.0 <= float(loss) <= 4.0
    # A student constant over time with the teacher's features gives 0.
    constant = student_rca(t.expand(steps, -1, -1), t, delta=1e-4)
    assert float(constant) == pytest.approx(0.0, abs=1e-10)  # mean over T rounds


@FAST
@given(seed=seeds, steps=st.integers(1, 4), n=st.integers(1, 6))
def test_student_rca_per_step_is_the_mean_of_step_rcas(seed: int, steps: int, n: int) -> None:
    """Bounded in [0, 4], the mean of each step's RCA, equal to :func:`student_rca` when every
    step is the same, 0 when each step has the teacher's features, and invariant to a shared
    permutation of the batch (the relation matrix is permuted on both axes; float32 sums in
    another order: 1e-6 on terms <= 4 averaged over n^2 <= 36 entries)."""
    s_seq = _logits(seed, steps, n, 6).abs()
    t = _logits(seed + 1, n, 3)
    loss = student_rca_per_step(s_seq, t, delta=1e-4)
    assert 0.0 <= float(loss) <= 4.0
    ref = torch.stack([rca_loss(t, s_seq[i], delta=1e-4) for i in range(steps)]).mean()
    torch.testing.assert_close(loss, ref)
    same = s_seq[:1].expand(steps, -1, -1)
    torch.testing.assert_close(
        student_rca_per_step(same, t, delta=1e-4), student_rca(same, t, delta=1e-4)
    )
    assert float(student_rca_per_step(t.expand(steps, -1, -1), t, delta=1e-4)) < 1e-10
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    permuted = student_rca_per_step(s_seq[:, perm], t[perm], delta=1e-4)
    torch.testing.assert_close(permuted, loss, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="expected"):
        student_rca_per_step(s_seq[0], t, delta=1e-4)
