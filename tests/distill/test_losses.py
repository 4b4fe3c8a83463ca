"""Student losses (stars.distill.losses): property tests."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from error_model import U32, U64, kl_error, rca_max, rca_reorder_tol, relation_error
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples

from stars.distill.losses import kd_loss, student_rca, student_rca_per_step, tet_kd_loss
from stars.synthesis.losses import rca_loss

FAST = examples(20)
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
    # The same error model in float64 (u = 2^-53), for the reference and the loss each.
    tol64 = kl_error(z_max, k, temperature, U64)
    assert float(exact) >= -tol64
    ref = (
        F.kl_div(
            F.log_softmax(s64 / temperature, dim=1),
            F.softmax(t64 / temperature, dim=1),
            reduction="batchmean",
        )
        * temperature**2
    )
    torch.testing.assert_close(exact, ref, atol=2 * tol64, rtol=0)
    assert float(loss) == pytest.approx(float(exact), abs=tol + tol64, rel=0)
    # Invariant to adding a constant to either side's logits (softmax shift); the shifted
    # logits are up to 2 / tau larger.
    shifted = kd_loss(s64 + 2.0, t64 - 1.0, temperature=temperature)
    tol64_shifted = kl_error(z_max + 2.0 / temperature, k, temperature, U64)
    torch.testing.assert_close(shifted, exact, atol=tol64 + tol64_shifted, rtol=0)


def test_kd_gradient_flows_to_the_student_only_through_its_logits() -> None:
    s = _logits(0, 4, 5).requires_grad_()
    t = _logits(1, 4, 5)
    torch.autograd.backward(kd_loss(s, t, temperature=4.0))
    assert s.grad is not None
    assert torch.isfinite(s.grad).all()
    # d/ds [tau^2 KL] = tau * (p_S - p_T) / N, here in float64. float32: each probability is
    # off by <= 8 u (z_max + log k + 1) (relative, as in error_model.kl_error), the two by
    # twice that, times tau / N.
    expected = 4.0 * (F.softmax(s.detach().double() / 4.0, 1) - F.softmax(t.double() / 4.0, 1)) / 4
    z_max = max(float(s.detach().abs().max()), float(t.abs().max())) / 4.0
    tol = 4.0 / 4 * 16 * U32 * (z_max + math.log(5) + 1)
    torch.testing.assert_close(s.grad.double(), expected, atol=tol, rtol=0)
    with pytest.raises(ValueError, match="shapes"):
        kd_loss(s, t[:2], temperature=1.0)


@FAST
@given(seed=seeds, steps=st.integers(1, 4), n=st.integers(1, 4), temperature=temperatures)
def test_tet_kd_is_the_mean_of_per_step_kd(
    seed: int, steps: int, n: int, temperature: float
) -> None:
    s_seq, t = _logits(seed, steps, n, 5), _logits(seed + 1, n, 5)
    loss = tet_kd_loss(s_seq, t, temperature=temperature)
    # The identity in float64 (each side within kl_error with u = 2^-53; a mean keeps it), and
    # the float32 loss within kl_error of it.
    s64, t64 = s_seq.double(), t.double()
    ref = torch.stack([kd_loss(s64[i], t64, temperature=temperature) for i in range(steps)]).mean()
    z_max = max(float(s_seq.abs().max()), float(t.abs().max())) / temperature
    tol64 = kl_error(z_max, 5, temperature, U64)
    torch.testing.assert_close(
        tet_kd_loss(s64, t64, temperature=temperature), ref, atol=2 * tol64, rtol=0
    )
    assert float(loss) == pytest.approx(float(ref), abs=kl_error(z_max, 5, temperature) + tol64)
    # Exactly 0: both sides' log-probabilities are the same computation.
    same = tet_kd_loss(t.expand(steps, -1, -1), t, temperature=temperature)
    assert float(same) == 0.0


@FAST
@given(seed=seeds, steps=st.integers(1, 4), n=st.integers(1, 6))
def test_student_rca_averages_over_time(seed: int, steps: int, n: int) -> None:
    s_seq = _logits(seed, steps, n, 6).abs()
    t = _logits(seed + 1, n, 3)
    loss = student_rca(s_seq, t, delta=1e-4)
    assert torch.equal(loss, rca_loss(t, s_seq.mean(0), delta=1e-4))  # the same computation
    assert 0.0 <= float(loss) <= rca_max(3, 6, n)
    # A student constant over time with the teacher's features gives 0, up to the mean over T
    # of T equal values (2 u relative per element: entries of R move by <= 2 e + 4 u).
    constant = student_rca(t.expand(steps, -1, -1), t, delta=1e-4)
    assert float(constant) <= (2 * relation_error(3) + 4 * U32) ** 2


@FAST
@given(seed=seeds, steps=st.integers(1, 4), n=st.integers(1, 6))
def test_student_rca_per_step_is_the_mean_of_step_rcas(seed: int, steps: int, n: int) -> None:
    """Bounded in [0, 4], the mean of each step's RCA, equal to :func:`student_rca` when every
    step is the same, 0 when each step has the teacher's features, and invariant to a shared
    permutation of the batch (the relation matrix is permuted on both axes; float32 sums in
    another order: error_model.rca_reorder_tol)."""
    s_seq = _logits(seed, steps, n, 6).abs()
    t = _logits(seed + 1, n, 3)
    loss = student_rca_per_step(s_seq, t, delta=1e-4)
    assert 0.0 <= float(loss) <= rca_max(3, 6, n)
    ref = torch.stack([rca_loss(t, s_seq[i], delta=1e-4) for i in range(steps)]).mean()
    assert torch.equal(loss, ref)  # the same computation
    # Every step the same: the mean of T equal losses (T u) against the loss of the mean over
    # T of equal rows (2 u relative per element: entries of R move by 4 u more).
    same = s_seq[:1].expand(steps, -1, -1)
    per_step = float(student_rca_per_step(same, t, delta=1e-4))
    tol = rca_reorder_tol(3, 6, n, per_step, shift=4 * U32) + steps * U32 * per_step
    assert per_step == pytest.approx(float(student_rca(same, t, delta=1e-4)), abs=tol)
    # Exactly 0: each step's R is the teacher's, from the same computation.
    assert float(student_rca_per_step(t.expand(steps, -1, -1), t, delta=1e-4)) == 0.0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    permuted = float(student_rca_per_step(s_seq[:, perm], t[perm], delta=1e-4))
    # each step within rca_reorder_tol, and the mean over T of them keeps it (+ T u)
    tol = rca_reorder_tol(3, 6, n, float(loss)) + steps * U32 * float(loss)
    assert permuted == pytest.approx(float(loss), abs=tol)
    with pytest.raises(ValueError, match="expected"):
        student_rca_per_step(s_seq[0], t, delta=1e-4)


def test_shape_errors_name_the_shapes() -> None:
    def exact(message: str) -> str:
        return "^" + re.escape(message) + "$"

    t = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=exact("kd_loss: shapes differ ((2, 5) vs (3, 5))")):
        kd_loss(torch.zeros(2, 5), t, temperature=1.0)
    for s, teacher in (
        (torch.zeros(3, 5), t),  # no time axis
        (torch.zeros(2, 4, 5), t),  # another batch
        (torch.zeros(2, 3, 5, 4), torch.zeros(3, 5, 4)),  # [T, *teacher] but not 3-D
    ):
        shapes = f"{tuple(s.shape)}, {tuple(teacher.shape)}"
        message = f"tet_kd_loss: expected s_logits_seq [T, N, K] and t_logits [N, K]; got {shapes}"
        with pytest.raises(ValueError, match=exact(message)):
            tet_kd_loss(s, teacher, temperature=1.0)
    for fn in (student_rca, student_rca_per_step):
        message = f"{fn.__name__}: expected [T, N, D] features, got (3, 5)"
        with pytest.raises(ValueError, match=exact(message)):
            fn(t, t, delta=1e-4)
