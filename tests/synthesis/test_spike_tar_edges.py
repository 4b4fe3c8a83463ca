"""Spike-aware TAR at its edges: every refused input with its message, hand-computed values
of the maps and the loss, the quantile's index bounds, the shapes of reduce_maps, the device
the results live on (PyTorch's ``meta`` device stands in for an accelerator), and how
SpikeTailTerm passes its config on (thresholds, constant targets, granularity, gate)."""

from __future__ import annotations

import math
import re
from typing import Literal

import pytest
import torch
from error_model import COMPUTE_DTYPES, U32, U64

from stars.config import NeuronConfig, SpikeTARConfig
from stars.neurons import build_neuron
from stars.neurons.membrane import MembraneTap
from stars.synthesis.priors import BNLayerPrior, BNPrior
from stars.synthesis.spike_tar import (
    NORMALIZE_EPS,
    VARIANCE_FLOOR,
    Granularity,
    SpikeTailTerm,
    batch_quantile_thresholds,
    pair_layers,
    reduce_maps,
    spike_tail_loss,
    student_firing_map,
    teacher_exceedance_map,
)

META = torch.device("meta")


def exact(message: str) -> str:
    """A ``match`` pattern for exactly ``message`` (pytest searches, so anchor both ends)."""
    return f"^{re.escape(message)}$"


# ----------------------------------------------------------------------------- pairing


@pytest.mark.parametrize(("s", "t"), [(0, 5), (5, 0), (0, 0), (-1, 3)])
def test_pair_layers_refuses_an_empty_side(s: int, t: int) -> None:
    with pytest.raises(
        ValueError, match=exact(f"pair_layers: need layers on both sides ({s}, {t})")
    ):
        pair_layers(s, t)


def test_pair_layers_messages_name_the_side_and_the_pairs() -> None:
    with pytest.raises(ValueError, match=exact("student index -5 is out of range for 4 layers")):
        pair_layers(4, 21, stages=[-5])
    with pytest.raises(ValueError, match=exact("student index 4 is out of range for 4 layers")):
        pair_layers(4, 21, pairs=[(4, 0)])
    with pytest.raises(ValueError, match=exact("teacher index -22 is out of range for 21 layers")):
        pair_layers(4, 21, pairs=[(0, -22)])
    with pytest.raises(ValueError, match=exact("pair_layers: no layer chosen")):
        pair_layers(4, 21, pairs=[])
    twice = "pair_layers: a student layer appears twice in [(0, 1), (0, 2)]"
    with pytest.raises(ValueError, match=exact(twice)):
        pair_layers(4, 21, pairs=[(0, 1), (-4, 2)])


def test_pair_layers_single_layers_and_repeated_stages() -> None:
    """One layer on each side pairs with itself; a stage named twice (once from the end) is
    one stage, and the lowest index on each side is a valid one."""
    assert pair_layers(1, 1) == [(0, 0)]
    assert pair_layers(1, 7) == [(0, 6)]
    assert pair_layers(3, 9, stages=[2, -1, 0]) == [(0, 2), (2, 8)]
    assert pair_layers(3, 9, pairs=[(-3, -9)]) == [(0, 0)]


# ----------------------------------------------------------------------------- the maps


def test_student_firing_map_hand_values_and_shapes() -> None:
    """``[T, N, C] -> [N]`` and ``[T, N, C, L] -> [N, L]``: the mean over T and C of the
    sigmoid at ``(H - V_th) / tau``. Potentials at ``V_th + tau z`` with ``sigmoid(z)`` known:
    z = 0 (1/2) and z = +-ln 3 (3/4 and 1/4)."""
    v_th, tau = 0.75, 0.5
    ln3 = math.log(3.0)
    # T = 2, N = 3, C = 2: sample n's four z values, arranged so that the mean over (T, C)
    # differs from the mean over any other pair of axes
    z = torch.tensor(
        [
            [[0.0, 0.0], [ln3, ln3], [-ln3, 0.0]],
            [[ln3, -ln3], [ln3, 0.0], [-ln3, -ln3]],
        ],
        dtype=torch.float64,
    )
    h = v_th + tau * z
    a = student_firing_map(h, v_threshold=v_th, tau=tau)
    expected = torch.tensor([0.5, (0.75 * 3 + 0.5) / 4, (0.25 * 3 + 0.5) / 4], dtype=torch.float64)
    assert a.dtype == torch.float64 and a.shape == (3,)
    # float64: z is rebuilt from h within a few u of ln 3 (<= 2), sigmoid' <= 1/4, a mean of 4
    torch.testing.assert_close(a, expected, rtol=0.0, atol=16 * U64)
    a4 = student_firing_map(h[..., None].expand(2, 3, 2, 5), v_threshold=v_th, tau=tau)
    assert a4.shape == (3, 5)
    torch.testing.assert_close(a4, expected[:, None].expand(3, 5), rtol=0.0, atol=16 * U64)


@pytest.mark.parametrize(("dtype", "out"), COMPUTE_DTYPES)
def test_student_firing_map_dtype(dtype: torch.dtype, out: torch.dtype) -> None:
    h = torch.ones(2, 3, 4, 2, 2, dtype=dtype)
    a = student_firing_map(h, v_threshold=1.0, tau=0.5)
    assert a.dtype == out
    assert torch.equal(a, torch.full((3, 2, 2), 0.5, dtype=out))  # sigmoid(0) = 1/2 exactly


def test_student_firing_map_refuses_bad_input() -> None:
    msg = "student_firing_map: expected H [T, N, C, *], got (2, 3)"
    with pytest.raises(ValueError, match=exact(msg)):
        student_firing_map(torch.zeros(2, 3), v_threshold=1.0, tau=0.5)
    for tau in (0.0, -0.5, math.nan):
        with pytest.raises(
            ValueError, match=exact(f"student_firing_map: tau must be > 0, got {tau}")
        ):
            student_firing_map(torch.zeros(2, 3, 4), v_threshold=1.0, tau=tau)


def test_teacher_exceedance_map_hand_values() -> None:
    """``[N, C] -> [N]`` and ``[N, C, L] -> [N, L]``: the channel mean of the sigmoid at
    ``(h - theta_c) / tau_c``, in float32 also for float64 input; per-channel thresholds and
    temperatures line up with the channel axis (C = 3, L = 2: no other axis has length 3)."""
    theta = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    tau = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    ln3 = math.log(3.0)
    # sample 0 sits at z = (0, 0, 0), sample 1 at (ln 3, -ln 3, ln 3)
    z = torch.tensor([[0.0, 0.0, 0.0], [ln3, -ln3, ln3]], dtype=torch.float64)
    h = theta + tau * z
    a = teacher_exceedance_map(h, theta, tau)
    expected = torch.tensor([0.5, (0.75 + 0.25 + 0.75) / 3])
    assert a.dtype == torch.float32 and a.shape == (2,)
    # float32: h, theta and tau (<= 2.4) rounded by u each move z by <= 8 u / tau_min = 16 u,
    # the sigmoid (slope <= 1/4) by 4 u; the sigmoid, the mean of 3 and expected add a few u
    torch.testing.assert_close(a, expected, rtol=0.0, atol=16 * U32)
    a3 = teacher_exceedance_map(h[..., None].expand(2, 3, 2), theta, tau)
    assert a3.shape == (2, 2)
    torch.testing.assert_close(a3, expected[:, None].expand(2, 2), rtol=0.0, atol=16 * U32)


def test_teacher_exceedance_map_refuses_bad_shapes() -> None:
    def msg(h: tuple[int, ...], th: tuple[int, ...], ta: tuple[int, ...]) -> str:
        return (
            f"teacher_exceedance_map: expected h [N, C, *], theta [C], tau [C]; got {h}, {th}, {ta}"
        )

    c3, c5 = torch.zeros(3), torch.ones(5)
    with pytest.raises(ValueError, match=exact(msg((3,), (3,), (3,)))):
        teacher_exceedance_map(torch.zeros(3), c3, c3)
    with pytest.raises(ValueError, match=exact(msg((2, 3, 5), (5,), (3,)))):
        teacher_exceedance_map(torch.zeros(2, 3, 5), c5, c3)
    with pytest.raises(ValueError, match=exact(msg((2, 3, 5), (3,), (5,)))):
        teacher_exceedance_map(torch.zeros(2, 3, 5), c3, c5)
    with pytest.raises(ValueError, match=exact(msg((2, 3, 5), (3, 1), (3,)))):
        teacher_exceedance_map(torch.zeros(2, 3, 5), c3[:, None], c3)


def test_maps_follow_the_activations_device() -> None:
    """Thresholds kept on the CPU (the BN prior) are moved to the activations' device: on
    ``meta`` a CPU ``[C]`` tensor cannot meet the activations, so this fails unless they are."""
    h = torch.empty(2, 3, 4, 4, device=META)
    a = teacher_exceedance_map(h, torch.zeros(3), torch.ones(3))
    assert a.device == META and a.shape == (2, 4, 4)
    loss = spike_tail_loss(torch.empty(2, 4, 4, device=META), a)
    assert loss.device == META and loss.shape == ()


# ----------------------------------------------------------------------------- the quantile


def _ranked() -> torch.Tensor:
    """``[N=2, C=3, 2]``: channel c holds ``10 c + {0, 1, 2, 3}`` (m = 4 values per channel),
    spread over both samples and both positions in a scrambled order."""
    order = torch.tensor([[2.0, 0.0], [3.0, 1.0]])  # [N, L]: the rank of each value
    return torch.stack([order + 10 * c for c in range(3)], dim=1)


@pytest.mark.parametrize(
    ("tail", "k"),
    [
        (0.25, 3),  # (1 - q) m = 3 exactly: the 3rd smallest, not the 4th
        (0.5, 2),  # exactly 2
        (0.6, 2),  # ceil(1.6)
        (0.8, 1),  # ceil(0.8) = 1: the smallest
        (1 - 1e-12, 1),  # ceil(4e-12 - 1e-9) = 0, floored to the smallest
        (1e-12, 4),  # ceil(3.999...) = 4: the largest
    ],
)
def test_batch_quantile_thresholds_pick_the_kth_smallest(tail: float, k: int) -> None:
    """``k = min(m, max(1, ceil((1 - q) m - 1e-9)))`` on a channel of 4 known values."""
    h = _ranked().requires_grad_(True)
    theta = batch_quantile_thresholds(h, tail)
    assert torch.equal(theta, torch.tensor([k - 1.0, 10 + k - 1.0, 20 + k - 1.0]))
    assert not theta.requires_grad


def test_batch_quantile_thresholds_float32_and_one_value() -> None:
    """float64 input gives float32 thresholds; a single value per channel is its own
    threshold for any tail mass."""
    theta = batch_quantile_thresholds(_ranked().double(), 0.25)
    assert theta.dtype == torch.float32
    one = torch.tensor([[5.0, -1.0]])  # N = 1, C = 2, no space
    for tail in (1e-6, 0.5, 1 - 1e-6):
        assert torch.equal(batch_quantile_thresholds(one, tail), torch.tensor([5.0, -1.0]))


@pytest.mark.parametrize("tail", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_batch_quantile_thresholds_refuse_a_tail_outside_0_1(tail: float) -> None:
    msg = f"batch_quantile_thresholds: tail_mass must be in (0, 1), got {tail}"
    with pytest.raises(ValueError, match=exact(msg)):
        batch_quantile_thresholds(_ranked(), tail)


# ----------------------------------------------------------------------------- reduce_maps


def test_reduce_maps_pools_each_axis_to_the_coarser_grid() -> None:
    """Student ``[2, 4, 8]`` against teacher ``[2, 8, 4]``: the common grid is 4 x 4, the
    student's columns and the teacher's rows averaged in pairs. Small integers: every pooled
    value (a half-integer), sum and mean over 16 or 32 values is exact in float32."""
    a = torch.arange(64.0).view(2, 4, 8)
    b = torch.arange(64.0).flip(0).view(2, 8, 4)
    a_pool = a.view(2, 4, 4, 2).mean(-1)
    b_pool = b.view(2, 4, 2, 4).mean(2)
    s, t = reduce_maps(a, b, "spatial")
    assert torch.equal(s, a_pool) and torch.equal(t, b_pool)
    s, t = reduce_maps(b, a, "spatial")
    assert torch.equal(s, b_pool) and torch.equal(t, a_pool)
    s, t = reduce_maps(a, b, "sample")
    assert torch.equal(s, a_pool.mean((1, 2))) and torch.equal(t, b_pool.mean((1, 2)))
    s, t = reduce_maps(a, b, "batch")
    assert torch.equal(s, a_pool.mean().reshape(1)) and torch.equal(t, b_pool.mean().reshape(1))


@pytest.mark.parametrize("granularity", ["spatial", "sample", "batch"])
def test_reduce_maps_per_sample_side(granularity: Granularity) -> None:
    """A ``[N]`` map on either side averages the other one over space (any number of spatial
    axes); the result is ``[N]``, or ``[1]`` for ``batch``."""
    flat = torch.tensor([0.25, 0.75])
    grid = torch.arange(32.0).view(2, 4, 4)
    line = torch.arange(10.0).view(2, 5)
    per_sample = {"grid": torch.tensor([7.5, 23.5]), "line": torch.tensor([2.0, 7.0])}
    for other, name in ((grid, "grid"), (line, "line")):
        want = per_sample[name]
        if granularity == "batch":
            want, flat_want = want.mean().reshape(1), flat.mean().reshape(1)
        else:
            flat_want = flat
        s, t = reduce_maps(flat, other, granularity)
        assert torch.equal(s, flat_want) and torch.equal(t, want)
        s, t = reduce_maps(other, flat, granularity)
        assert torch.equal(s, want) and torch.equal(t, flat_want)


def test_reduce_maps_refuses_mismatched_maps() -> None:
    """Each message names the function the caller called."""
    with pytest.raises(ValueError, match=exact("reduce_maps: batch sizes differ (3 vs 2)")):
        reduce_maps(torch.zeros(3, 4, 4), torch.zeros(2, 4, 4), "spatial")
    with pytest.raises(ValueError, match=exact("spike_tail_loss: batch sizes differ (2 vs 3)")):
        spike_tail_loss(torch.zeros(2), torch.zeros(3, 2, 2), granularity="sample")
    for a, b in (((2, 5), (2, 5)), ((2, 4, 4), (2, 5)), ((2, 5), (2, 4, 4)), ((2, 1, 4, 4),) * 2):
        shapes = f"got {torch.Size(a)}, {torch.Size(b)}"
        with pytest.raises(
            ValueError, match=exact(f"reduce_maps: maps must be [N] or [N, H, W]; {shapes}")
        ):
            reduce_maps(torch.zeros(a), torch.zeros(b), "spatial")
        with pytest.raises(
            ValueError, match=exact(f"spike_tail_loss: maps must be [N] or [N, H, W]; {shapes}")
        ):
            spike_tail_loss(torch.zeros(a), torch.zeros(b))


# ----------------------------------------------------------------------------- the loss


def test_unnormalized_loss_hand_values() -> None:
    """``mean (a_s - a_t)^2 / max(pbar (1 - pbar), 1e-3)`` on dyadic maps, per granularity."""
    a_t = torch.full((2, 2, 2), 0.5)  # pbar = 1/2: v = 1/4
    a_s = torch.tensor([[[0.5, 0.75], [0.25, 0.5]], [[1.0, 1.0], [0.5, 0.5]]])
    # differences 0, 1/4, -1/4, 0 | 1/2, 1/2, 0, 0: squares sum to 5/8, over 8 units, over 1/4
    spatial = spike_tail_loss(a_s, a_t, normalize=False)
    assert float(spatial) == (5 / 8) / 8 / 0.25  # dyadic throughout: exact
    # per sample: means 1/2 and 3/4 against 1/2: (0 + 1/16) / 2 / (1/4)
    sample = spike_tail_loss(a_s, a_t, granularity="sample", normalize=False)
    assert float(sample) == (1 / 16) / 2 / 0.25
    # the batch: 5/8 against 1/2: (1/8)^2 / (1/4)
    batch = spike_tail_loss(a_s, a_t, granularity="batch", normalize=False)
    assert float(batch) == (1 / 64) / 0.25
    # pbar = 1/4: v = 3/16 (exact), above the floor; each term 1/3 is rounded (u), and the
    # mean of 8 terms adds <= 8 u (error_model's mean bound)
    a_q = torch.full((2, 2, 2), 0.25)
    third = spike_tail_loss(a_q + 0.25, a_q, normalize=False)
    assert float(third) == pytest.approx((1 / 16) / (3 / 16), rel=10 * U32)


@pytest.mark.parametrize("level", [0.0, 1.0, 1e-4])
def test_unnormalized_loss_variance_floor(level: float) -> None:
    """A target that is (almost) all 0 or all 1 has a Bernoulli variance at or near 0: the
    floor ``1e-3`` bounds the loss at ``1000`` times the squared error."""
    a_t = torch.full((2, 3, 3), level)
    a_s = torch.full((2, 3, 3), 0.5)
    loss = spike_tail_loss(a_s, a_t, granularity="sample", normalize=False)
    d2 = (0.5 - level) ** 2
    assert VARIANCE_FLOOR == 1e-3
    # float32, relative: the per-sample means (9 terms: 9 u on the target's, <= 1e-4 of d)
    # and the difference move d by <= 2 u, its square by 4 u; 1e-3's rounding, the division
    # and the mean of 2 add 4 u: 16 u covers it
    assert float(loss) == pytest.approx(d2 / VARIANCE_FLOOR, rel=16 * U32)


def test_normalized_loss_hand_values() -> None:
    """With ``normalize`` each side is divided by its mean plus ``1e-6``: a map at the level of
    the epsilon is halved, not blown up, and the compared patterns keep their shape."""
    assert NORMALIZE_EPS == 1e-6
    tiny = torch.full((2, 2, 2), 1e-6)
    one = torch.ones(2, 2, 2)
    loss = spike_tail_loss(tiny, one)  # normalize is the default
    # exactly (1/2 - 1 / (1 + 1e-6))^2. float32: each side (<= 1) is off by its mean of 8
    # terms (8 u), the sum with the epsilon and the division (2 u); the difference (~1/2) by
    # <= 21 u, its square by <= 21 u, and the final mean of 8 adds 2 u: 64 u covers it
    assert float(loss) == pytest.approx((0.5 - 1 / (1 + 1e-6)) ** 2, abs=64 * U32)
    # per sample, samples at 1 and 3 against equal ones: normalized 1/2 and 3/2 against 1
    a_s = torch.tensor([1.0, 3.0])
    loss = spike_tail_loss(a_s, torch.ones(2), granularity="sample", normalize=True)
    # the epsilon moves each normalized value by <= 1e-6 relative (1.5e-6 absolute), so the
    # mean of the two squares (1/4) by <= 2 * 2 * (1/2) * 1.5e-6; float32 adds a few u
    assert float(loss) == pytest.approx(0.25, abs=3e-6 + 16 * U32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool, torch.int64])
def test_gate_dtype_does_not_change_the_loss(dtype: torch.dtype) -> None:
    """A gate in any dtype is a 0/1 gate: the loss is the float32 value of a float32 gate."""
    a_s, a_t = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)).unbind(0)
    gate = torch.tensor([1.0, 0.0, 1.0, 1.0])
    ref = spike_tail_loss(a_s, a_t, weights=gate)
    loss = spike_tail_loss(a_s, a_t, weights=gate.to(dtype))
    assert loss.dtype == torch.float32 and torch.equal(loss, ref)


def test_loss_refuses_batch_with_normalize_or_weights() -> None:
    msg = exact("spike_tail_loss: granularity 'batch' takes neither normalize nor weights")
    a = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=msg):
        spike_tail_loss(a, a, granularity="batch", normalize=True)
    with pytest.raises(ValueError, match=msg):
        spike_tail_loss(a, a, granularity="batch", normalize=False, weights=torch.ones(3))
    assert float(spike_tail_loss(a, a, granularity="batch", normalize=False)) == 0.0


def test_loss_refuses_weights_of_another_shape() -> None:
    a = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(0))
    for shape in ((4,), (3, 1), (2,)):
        msg = f"spike_tail_loss: weights must be [N], got {shape}"
        with pytest.raises(ValueError, match=exact(msg)):
            spike_tail_loss(a, a, weights=torch.ones(shape))


@pytest.mark.parametrize("normalize", [False, True])
def test_gate_on_spatial_maps_and_a_single_sample(normalize: bool) -> None:
    """Spatial maps ``[N=3, 2, 2]`` (N differs from H and W): the gated loss is the mean over
    the kept samples of each sample's spatial mean; one kept sample gives its own loss."""
    a_s = torch.tensor(
        [
            [[0.5, 0.5], [0.5, 0.5]],
            [[0.75, 0.25], [0.5, 0.5]],
            [[1.0, 0.0], [1.0, 0.5]],
        ]
    )
    a_t = torch.full((3, 2, 2), 0.5)
    whole = spike_tail_loss(a_s, a_t, normalize=normalize)
    if normalize:  # the loss's own steps: each side over its mean plus the epsilon, v = 1
        sq = (a_s / (a_s.mean() + NORMALIZE_EPS) - a_t / (a_t.mean() + NORMALIZE_EPS)).pow(2)
    else:  # pbar = 1/2: v = 1/4, and dividing by it is multiplying by 4 (exact)
        sq = (a_s - a_t).pow(2) * 4
    per_sample = sq.flatten(1).mean(1)
    # The same float32 operations on the same values as the loss: one or two kept samples
    # give these per-sample means bitwise (a 0/1 weighted sum adds exact zeros; over 1 or 2).
    for i in range(3):
        keep = torch.zeros(3)
        keep[i] = 1.0
        one = spike_tail_loss(a_s, a_t, normalize=normalize, weights=keep)
        assert float(one) == float(per_sample[i])
    two = spike_tail_loss(a_s, a_t, normalize=normalize, weights=torch.tensor([0.0, 1.0, 1.0]))
    assert float(two) == float(per_sample[1:].mean())
    every = spike_tail_loss(a_s, a_t, normalize=normalize, weights=torch.ones(3))
    # a mean of 12 terms in two orders (3 means of 4, or all at once): each within 12 u of the
    # largest term of the exact mean (error_model), so within twice that of each other
    assert float(every) == pytest.approx(float(whole), abs=2 * 12 * U32 * float(sq.max()))
    assert float(whole) > 0.1  # the samples differ: the single-sample checks mean something


# ----------------------------------------------------------------------------- the term


def _prior() -> BNPrior:
    """Two BN layers of 3 channels; std = sqrt(var + eps) = (2, 3, 4) and (1, 2, 4)."""
    return BNPrior(
        layers=(
            BNLayerPrior(torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 8.0, 15.0]), 1.0),
            BNLayerPrior(torch.tensor([0.5, 0.0, -1.0]), torch.tensor([0.5, 3.5, 15.5]), 0.5),
        )
    )


def test_term_thresholds_temperatures_and_constants() -> None:
    """``theta = mean + kappa std`` and ``tau = teacher_tau_rel std`` per BN layer (dyadic:
    exact); the constant targets are the float64 tail masses above kappa."""
    term = SpikeTailTerm(SpikeTARConfig(kappa=1.5, teacher_tau_rel=0.25), _prior())
    assert term.num_teacher == 2 and term.constant is None
    assert torch.equal(term.theta[0], torch.tensor([4.0, 2.5, 6.0]))
    assert torch.equal(term.theta[1], torch.tensor([2.0, 3.0, 5.0]))
    assert torch.equal(term.tau[0], torch.tensor([0.5, 0.75, 1.0]))
    assert torch.equal(term.tau[1], torch.tensor([0.25, 0.5, 1.0]))
    # kappa = 1.1 is not a float32 value: a float32 tail would be ~1e-8 off; float64's ndtr
    # and exp are within a few u (1e-16) of the closed forms
    kappa = 1.1
    g = SpikeTailTerm(SpikeTARConfig(kappa=kappa, target="gaussian", normalize=False), _prior())
    assert g.constant == pytest.approx(0.5 * math.erfc(kappa / math.sqrt(2)), rel=0, abs=1e-15)
    lap = SpikeTailTerm(SpikeTARConfig(kappa=kappa, target="laplace", normalize=False), _prior())
    assert lap.constant == pytest.approx(0.5 * math.exp(-math.sqrt(2) * kappa), rel=0, abs=1e-15)


def test_term_pairs_follow_stages_and_pairs() -> None:
    prior = _prior()
    assert SpikeTailTerm(SpikeTARConfig(), prior).pairs(4) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert SpikeTailTerm(SpikeTARConfig(stages=(-1, 1)), prior).pairs(4) == [(1, 0), (3, 1)]
    assert SpikeTailTerm(SpikeTARConfig(pairs=((2, 0),)), prior).pairs(4) == [(2, 0)]
    neurons = [torch.nn.Identity() for _ in range(4)]
    tapped = SpikeTailTerm(SpikeTARConfig(stages=(-1, 1)), prior).tapped(neurons)
    assert len(tapped) == 2 and tapped[0] is neurons[1] and tapped[1] is neurons[3]


def test_term_to_moves_thresholds_and_returns_itself() -> None:
    term = SpikeTailTerm(SpikeTARConfig(), _prior())
    assert term.to(META) is term
    assert all(t.device == META for t in term.theta + term.tau)
    assert len(term.theta) == len(term.tau) == 2


def _neurons() -> list[torch.nn.Module]:
    return [build_neuron(NeuronConfig(v_threshold=0.5)) for _ in range(2)]


def _acts(seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randn(4, 3, 2, 2, generator=g) for i in range(2)}


def _run(neurons: list[torch.nn.Module], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for n in neurons:
        n(torch.randn(3, 4, 5, 4, 4, generator=g) + 0.4)  # T = 3, N = 4, C = 5, 4 x 4


@pytest.mark.parametrize(
    "cfg",
    [
        SpikeTARConfig(granularity="sample", normalize=False),
        SpikeTARConfig(granularity="sample", normalize=True),
        SpikeTARConfig(granularity="spatial", normalize=False, threshold="batch-quantile"),
        SpikeTARConfig(granularity="batch", normalize=False, target="laplace"),
    ],
)
def test_term_loss_passes_its_config_and_gate_on(cfg: SpikeTARConfig) -> None:
    """The term's loss is the sum over pairs of ``spike_tail_loss`` with the config's
    granularity and normalize and the given gate (the same computation: bitwise equal), and
    differs from the loss at the other settings on these maps."""
    term = SpikeTailTerm(cfg, _prior())
    neurons = _neurons()
    acts = _acts(1)
    gate = None if cfg.granularity == "batch" else torch.tensor([1.0, 0.0, 1.0, 1.0])
    with MembraneTap(neurons) as tap:
        _run(neurons, 2)
        maps = term.maps(acts, tap, neurons)
        loss = term.loss(acts, tap, neurons, gate=gate)

    def total(granularity: Granularity, normalize: bool, weights: torch.Tensor | None) -> float:
        return float(
            sum(
                spike_tail_loss(
                    a_s, a_t, granularity=granularity, normalize=normalize, weights=weights
                )
                for a_s, a_t in maps
            )
        )

    assert len(maps) == 2
    assert float(loss) == total(cfg.granularity, cfg.normalize, gate)
    others: list[tuple[Granularity, bool, torch.Tensor | None]] = [
        ("spatial", True, gate),
        ("spatial", False, None),
        ("sample", False, gate),
        ("batch", False, None),
    ]
    for granularity, normalize, weights in others:
        if (granularity, normalize, weights) != (cfg.granularity, cfg.normalize, gate):
            # a different setting moves the loss far above float32 rounding (> 1e-4 here)
            assert abs(total(granularity, normalize, weights) - float(loss)) > 1e-4


@pytest.mark.parametrize("threshold", ["bn", "batch-quantile"])
def test_term_teacher_maps_use_the_chosen_thresholds(
    threshold: Literal["bn", "batch-quantile"],
) -> None:
    cfg = SpikeTARConfig(threshold=threshold, tail_mass=0.25, kappa=0.5)
    term = SpikeTailTerm(cfg, _prior())
    neurons = _neurons()
    acts = _acts(3)
    with MembraneTap(neurons) as tap:
        _run(neurons, 4)
        maps = term.maps(acts, tap, neurons)
        # the student side: the tap's map at temperature tau_rel * V_th (0.2 * 0.5)
        fresh = [tap.firing_map(n, cfg.tau_rel * 0.5) for n in neurons]
    for t, (a_s, a_t) in enumerate(maps):
        h = acts[t]
        theta = batch_quantile_thresholds(h, 0.25) if threshold != "bn" else term.theta[t]
        other = batch_quantile_thresholds(h, 0.25) if threshold == "bn" else term.theta[t]
        assert torch.equal(a_t, teacher_exceedance_map(h, theta, term.tau[t]))
        assert not torch.allclose(a_t, teacher_exceedance_map(h, other, term.tau[t]))
        assert a_s.shape == (4, 4, 4) and torch.equal(a_s, fresh[t])


def test_term_constant_target_on_the_activations_device() -> None:
    """A constant target is a map ``[N, H, W]`` of the tail mass, made where the teacher's
    activations are (``meta`` here, while the student runs on the CPU)."""
    cfg = SpikeTARConfig(target="gaussian", normalize=False, kappa=1.0)
    term = SpikeTailTerm(cfg, _prior())
    neurons = _neurons()
    acts = {i: torch.empty(4, 3, 2, 6, device=META) for i in range(2)}
    with MembraneTap(neurons) as tap:
        _run(neurons, 5)
        maps = term.maps(acts, tap, neurons)
    assert term.constant is not None
    for a_s, a_t in maps:
        assert a_s.shape == (4, 4, 4) and a_s.device.type == "cpu"
        assert a_t.shape == (4, 2, 6) and a_t.device == META and a_t.dtype == torch.float32
    cpu = {i: torch.zeros(4, 3, 2, 6) for i in range(2)}
    with MembraneTap(neurons) as tap:
        _run(neurons, 5)
        (_, a_t), _ = term.maps(cpu, tap, neurons)
    assert torch.equal(a_t, torch.full((4, 2, 6), term.constant))
