"""The membrane tap at its edges: refused inputs with their messages, hand-computed
potentials for each charge and reset, dtypes, the device results live on (PyTorch's ``meta``
device stands in for an accelerator), and the tap's bookkeeping (re-entry, a failed hook
registration, a neuron called twice, iteration)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from error_model import COMPUTE_DTYPES, U32, U64

from stars.config import NeuronConfig
from stars.neurons import build_neuron
from stars.neurons.membrane import (
    MembraneParams,
    MembraneTap,
    membrane_potential,
    soft_firing,
    soft_firing_map,
)

META = torch.device("meta")
LIF_HARD = MembraneParams(tau=2.0, decay_input=True, v_threshold=1.0, v_reset=-0.5)


def exact(message: str) -> str:
    """A ``match`` pattern for exactly ``message`` (pytest searches, so anchor both ends)."""
    return f"^{re.escape(message)}$"


# ----------------------------------------------------------------------------- refusals


def test_membrane_potential_refuses_mismatched_or_flat_input() -> None:
    def msg(a: tuple[int, ...], b: tuple[int, ...]) -> str:
        return (
            "membrane_potential: expected x_seq and spike_seq of the same shape [T, N, *]; got "
            f"{a} and {b}"
        )

    with pytest.raises(ValueError, match=exact(msg((3, 2), (3, 3)))):
        membrane_potential(torch.zeros(3, 2), torch.zeros(3, 3), LIF_HARD)
    with pytest.raises(ValueError, match=exact(msg((3,), (3,)))):
        membrane_potential(torch.zeros(3), torch.zeros(3), LIF_HARD)
    assert membrane_potential(torch.zeros(3, 2), torch.zeros(3, 2), LIF_HARD).shape == (3, 2)


def test_soft_firing_map_refuses_mismatched_or_short_input() -> None:
    def msg(a: tuple[int, ...], b: tuple[int, ...]) -> str:
        return (
            "soft_firing_map: expected x_seq and spike_seq of the same shape [T, N, C, *]; got "
            f"{a} and {b}"
        )

    with pytest.raises(ValueError, match=exact(msg((2, 3, 4), (2, 3, 5)))):
        soft_firing_map(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), LIF_HARD, tau=0.5)
    with pytest.raises(ValueError, match=exact(msg((2, 3), (2, 3)))):
        soft_firing_map(torch.zeros(2, 3), torch.zeros(2, 3), LIF_HARD, tau=0.5)
    for tau in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match=exact(f"soft_firing_map: tau must be > 0, got {tau}")):
            soft_firing_map(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), LIF_HARD, tau=tau)
        with pytest.raises(ValueError, match=exact(f"soft_firing: tau must be > 0, got {tau}")):
            soft_firing(torch.zeros(2, 3), 1.0, tau)
    # [T, N, C] is the least: a map [N]
    assert soft_firing_map(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), LIF_HARD, tau=0.5).shape == (
        3,
    )


# ----------------------------------------------------------------------------- hand values

# One neuron, T = 4, inputs and spikes chosen by hand (the spikes need not be the ones the
# inputs would cause: the replay takes them as given). All values are dyadic, so every
# potential below is exact in float32.
X = torch.tensor([1.0, 0.5, 2.0, -1.0])
S = torch.tensor([0.0, 1.0, 0.0, 1.0])

CASES: list[tuple[str, MembraneParams, list[float]]] = [
    # IF, soft reset: H = V + X, V = H - S V_th (V_th = 1.5); V[-1] = 0
    ("if-soft", MembraneParams(None, True, 1.5, None), [1.0, 1.5, 2.0, 1.0]),
    # IF, hard reset to -0.5: V[-1] = -0.5, V = S V_r + (1 - S) H
    ("if-hard", MembraneParams(None, True, 1.0, -0.5), [0.5, 1.0, 1.5, 0.5]),
    # LIF tau = 2, decay_input, soft: H = V / 2 + X / 2
    ("lif-soft", MembraneParams(2.0, True, 1.0, None), [0.5, 0.5, 0.75, -0.125]),
    # LIF tau = 2, decay_input, hard to -0.5: H = V / 2 + X / 2 + V_r / 2
    ("lif-hard", MembraneParams(2.0, True, 1.0, -0.5), [0.0, 0.0, 0.5, -0.5]),
    # LIF tau = 4 without decay_input, hard to 0.5: H = 3 V / 4 + X + V_r / 4
    ("lif-hard-nodecay", MembraneParams(4.0, False, 1.0, 0.5), [1.5, 1.75, 2.5, 1.0]),
    # LIF tau = 4 without decay_input, soft (V_th = 0.5): H = 3 V / 4 + X
    ("lif-soft-nodecay", MembraneParams(4.0, False, 0.5, None), [1.0, 1.25, 2.5625, 0.921875]),
]


@pytest.mark.parametrize(("name", "params", "expected"), CASES, ids=[c[0] for c in CASES])
def test_membrane_potential_hand_values(
    name: str, params: MembraneParams, expected: list[float]
) -> None:
    """The recurrence of the module docstring, step by step (dyadic values: exact)."""
    h = membrane_potential(X.view(4, 1), S.view(4, 1), params)
    assert h.dtype == torch.float32
    assert torch.equal(h.flatten(), torch.tensor(expected)), name


@pytest.mark.parametrize(("name", "params", "expected"), CASES, ids=[c[0] for c in CASES])
def test_soft_firing_map_hand_values_and_gradient(
    name: str, params: MembraneParams, expected: list[float]
) -> None:
    """The fused map is the mean over T and C of ``sigmoid((H - V_th) / tau)`` at the hand
    potentials, and its gradient is ``sum_t sigmoid'(z_t) / (tau T C) dH[t]/dX`` with the
    Jacobian of the recurrence (spikes fixed) taken from autograd through the plain replay.
    float64: both sides compute a handful of operations on values <= 4 (z <= 8); 1e-14 is far
    above their rounding (a few u per operation, times the sigmoid's slope) and far below any
    change of a charge, reset or temperature."""
    tau = 0.5
    # C = 2 channels: the second is the first shifted by 1/4 (N = 1)
    x = torch.stack([X, X + 0.25], dim=-1).view(4, 1, 2).double().requires_grad_(True)
    s = torch.stack([S, S], dim=-1).view(4, 1, 2).double()
    h = membrane_potential(x, s, params)
    q = torch.sigmoid((h - params.v_threshold) / tau)
    ref = q.mean((0, 2))
    assert torch.equal(h[:, 0, 0].detach(), torch.tensor(expected, dtype=torch.float64)), name
    fused = soft_firing_map(x, s, params, tau=tau)
    assert fused.shape == (1,) and fused.dtype == torch.float64
    torch.testing.assert_close(fused, ref, rtol=0.0, atol=1e-14)  # float64: see above
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    (g_fused,) = torch.autograd.grad(fused.sum(), x)
    assert g_fused.dtype == torch.float64 and g_ref.abs().sum() > 1e-3
    torch.testing.assert_close(g_fused, g_ref, rtol=0.0, atol=1e-14)  # float64: see above


def test_soft_firing_hand_values() -> None:
    """``sigmoid((H - V_th) / tau)``: z = 0, +-ln 3 give 1/2, 3/4, 1/4."""
    v_th, tau = 0.75, 0.5
    z = torch.tensor([0.0, math.log(3.0), -math.log(3.0)], dtype=torch.float64)
    q = soft_firing(v_th + tau * z, v_th, tau)
    # float64: z rebuilt from H within a few u of ln 3, the sigmoid's slope <= 1/4
    torch.testing.assert_close(
        q, torch.tensor([0.5, 0.75, 0.25], dtype=torch.float64), rtol=0.0, atol=8 * U64
    )


# ----------------------------------------------------------------------------- dtypes, devices


@pytest.mark.parametrize(("dtype", "out"), COMPUTE_DTYPES)
def test_dtypes_of_the_replay_and_the_map(dtype: torch.dtype, out: torch.dtype) -> None:
    """Potentials and maps in float32 (float64 for float64 input); the map's gradient in the
    input's dtype. Inputs at the threshold of an IF neuron that never fired: H[0] = V_th."""
    p = MembraneParams(None, True, 0.5, None)
    x = torch.zeros(2, 3, 4, dtype=dtype)
    x[0] = 0.5
    x.requires_grad_(True)
    spikes = torch.zeros(2, 3, 4, dtype=dtype)
    h = membrane_potential(x, spikes, p)
    assert h.dtype == out and torch.equal(h, torch.full((2, 3, 4), 0.5, dtype=out))
    a = soft_firing_map(x, spikes, p, tau=0.25)
    # every H is V_th: sigmoid(0) = 1/2 exactly, in every dtype
    assert a.dtype == out and torch.equal(a, torch.full((3,), 0.5, dtype=out))
    (g,) = torch.autograd.grad(a.sum(), x)
    assert g.dtype == dtype
    # d a / d X[t]: IF keeps all of X[0] in H[1], so X[0] gets two steps' worth; each step's
    # sigmoid' (1/4) / (tau T C) = (1/4) / (0.25 * 2 * 4) = 1/8 (exact in every dtype here)
    assert torch.equal(g[0], torch.full((3, 4), 0.25, dtype=dtype))
    assert torch.equal(g[1], torch.full((3, 4), 0.125, dtype=dtype))


@pytest.mark.parametrize("spike_dtype", [torch.float16, torch.bfloat16, torch.float64, torch.bool])
def test_the_spikes_dtype_does_not_matter(spike_dtype: torch.dtype) -> None:
    """The spikes are 0/1 in any dtype: potentials and map are those of float32 spikes,
    bitwise, also where a hard reset writes ``V_r = 0.1`` (not a float16 or bfloat16 value,
    so a reset computed in the spikes' dtype would show)."""
    p = MembraneParams(tau=2.0, decay_input=True, v_threshold=0.5, v_reset=0.1)
    x = torch.randn(5, 3, 4, 2, generator=torch.Generator().manual_seed(1)) + 0.6
    spikes = membrane_potential(x, torch.zeros_like(x), p) >= 0.5  # a pattern with resets
    ref = membrane_potential(x, spikes.float(), p)
    assert spikes.any() and (~spikes).any()
    other = spikes.to(spike_dtype)
    h = membrane_potential(x, other, p)
    assert h.dtype == torch.float32 and torch.equal(h, ref)
    a = soft_firing_map(x, other, p, tau=0.25)
    assert a.dtype == torch.float32
    assert torch.equal(a, soft_firing_map(x, spikes.float(), p, tau=0.25))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_is_replayed_in_float32(dtype: torch.dtype) -> None:
    """A half-precision input gives, bitwise, the potentials, map and gradient of its (exact)
    float32 copy: the recurrence starts from ``V_r = 0.1`` in float32, not in the input's
    dtype (where 0.1 is not representable)."""
    p = MembraneParams(tau=4.0, decay_input=False, v_threshold=0.5, v_reset=0.1)
    x = (torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2)) + 0.3).to(dtype)
    x32 = x.float().requires_grad_(True)
    x.requires_grad_(True)
    spikes = (membrane_potential(x32, torch.zeros_like(x32), p) >= 0.5).float()
    assert torch.equal(membrane_potential(x, spikes, p), membrane_potential(x32, spikes, p))
    a = soft_firing_map(x, spikes, p, tau=0.25)
    a32 = soft_firing_map(x32, spikes, p, tau=0.25)
    assert torch.equal(a, a32)
    (g,) = torch.autograd.grad(a.sum(), x)
    (g32,) = torch.autograd.grad(a32.sum(), x32)
    assert g.dtype == dtype and torch.equal(g, g32.to(dtype))


def test_map_and_gradient_follow_the_input_device() -> None:
    """On ``meta`` the map, its buffers and its gradient must all be made on the input's
    device: a buffer left on the CPU puts the result or the gradient there."""
    x = torch.empty(3, 2, 4, 5, device=META, requires_grad=True)
    for params in (LIF_HARD, MembraneParams(None, True, 1.0, None)):
        a = soft_firing_map(x, torch.empty(3, 2, 4, 5, device=META), params, tau=0.5)
        assert a.device == META and a.shape == (2, 5)
        (g,) = torch.autograd.grad(a.sum(), x)
        assert g.device == META and g.shape == x.shape
        h = membrane_potential(x, torch.empty(3, 2, 4, 5, device=META), params)
        assert h.device == META and h.shape == x.shape


def test_map_is_float32_for_float32_input_near_the_threshold() -> None:
    """A float32 map agrees with the float64 map of the same input within float32 rounding:
    the recurrence and the sigmoid run in float32, not in a lower precision."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, 2, generator=g, dtype=torch.float64) + 0.5
    spikes = (x > 0.8).double()
    a64 = soft_firing_map(x, spikes, LIF_HARD, tau=0.5)
    a32 = soft_firing_map(x.float(), spikes.float(), LIF_HARD, tau=0.5)
    assert a32.dtype == torch.float32
    # float32 against float64: each H within T 8 u M (M = |x|_max + |V_r| + V_th, as in
    # test_membrane's error model), moved by the sigmoid's slope 1 / (4 tau); the sigmoid
    # rounds by u and the mean of T C = 24 terms adds 24 u
    m = float(x.abs().max()) + 0.5 + 1.0
    torch.testing.assert_close(
        a32.double(), a64, rtol=0.0, atol=4 * 8 * U32 * m / (4 * 0.5) + 25 * U32
    )


# ----------------------------------------------------------------------------- params


def test_membrane_params_of_each_kind() -> None:
    lif = MembraneParams.of(build_neuron(NeuronConfig(kind="lif", tau=4.0, decay_input=False)))
    assert lif == MembraneParams(tau=4.0, decay_input=False, v_threshold=1.0, v_reset=0.0)
    lif_d = MembraneParams.of(build_neuron(NeuronConfig(kind="lif", v_reset=None)))
    assert lif_d == MembraneParams(tau=2.0, decay_input=True, v_threshold=1.0, v_reset=None)
    if_ = MembraneParams.of(build_neuron(NeuronConfig(kind="if", v_threshold=0.5)))
    assert if_.tau is None and if_.v_threshold == 0.5 and if_.v_reset == 0.0
    assert if_.decay_input is True  # IF has no decay_input: the default applies (unused)
    plif = MembraneParams.of(build_neuron(NeuronConfig(kind="plif", tau=3.0, decay_input=False)))
    # PLIF's tau = 1 / sigmoid(w) with w = -ln(tau - 1): float32 rounding of w and sigmoid
    assert plif.tau == pytest.approx(3.0, rel=8 * U32) and plif.decay_input is False


# ----------------------------------------------------------------------------- the tap


def test_tap_refusals_have_their_messages() -> None:
    neuron = build_neuron(NeuronConfig())
    with pytest.raises(
        TypeError, match=exact("MembraneTap hooks MultiStepNeuron layers, got ReLU")
    ):
        MembraneTap([neuron, torch.nn.ReLU()])
    with pytest.raises(ValueError, match=exact("MembraneTap got the same neuron twice")):
        MembraneTap([neuron, neuron])
    tap = MembraneTap([neuron])
    with tap:
        again = "this tap is already active; a tap cannot be entered twice"
        with pytest.raises(RuntimeError, match=exact(again)):
            tap.__enter__()
        assert tap.active and len(neuron._forward_hooks) == 1
    assert not tap.active and len(neuron._forward_hooks) == 0
    missing = (
        "MultiStepNeuron has not been captured: it is not hooked by this tap, did not run, "
        "or the block has exited"
    )
    with tap, pytest.raises(KeyError, match=exact(repr(missing))):
        tap.spikes(neuron)


def test_tap_removes_its_hooks_when_registration_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A neuron whose hook cannot be registered: the hooks already placed on the others are
    removed, the tap is inactive, and the error comes through."""
    first, second = build_neuron(NeuronConfig()), build_neuron(NeuronConfig())

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no hooks here")

    monkeypatch.setattr(second, "register_forward_hook", refuse)
    tap = MembraneTap([first, second])
    with pytest.raises(RuntimeError, match="no hooks here"), tap:
        pass
    assert not tap.active and len(first._forward_hooks) == 0
    first(torch.randn(2, 3, 4))
    assert len(tap) == 0


def test_tap_keeps_the_last_call_and_iterates_in_order() -> None:
    """A neuron called twice in the block: the potentials are those of the second call (the
    first one's cache is dropped). Iteration lists the captured neurons in the tap's order;
    those that did not run are neither listed, counted nor contained."""
    a, b, c = (build_neuron(NeuronConfig(kind="if", v_threshold=100.0)) for _ in range(3))
    p = MembraneParams.of(a)
    x1 = torch.full((2, 1, 3), 0.25)
    x2 = torch.full((2, 1, 3), 0.5)
    with MembraneTap([c, a, b]) as tap:
        assert tap.active and len(tap) == 0
        assert list(tap) == [] and a not in tap
        a(x1)
        h1 = tap[a]
        assert torch.equal(h1, membrane_potential(x1, torch.zeros_like(x1), p))
        a(x2)
        assert torch.equal(tap[a], membrane_potential(x2, torch.zeros_like(x2), p))
        assert not torch.equal(tap[a], h1)
        c(x1)
        assert list(tap) == [c, a] and len(tap) == 2
        assert a in tap and c in tap and b not in tap
        assert tap[c] is tap[c]  # cached between calls
        assert torch.equal(tap.spikes(a), torch.zeros_like(x2))  # far below threshold
    assert list(tap) == [] and len(tap) == 0 and a not in tap
