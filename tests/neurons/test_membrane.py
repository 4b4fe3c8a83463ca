"""The membrane tap: charged potentials replayed from a neuron's input and spikes."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from error_model import U32, U64
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples

from neurons.parity import Neuron, charge_error, clean_steps, trajectory
from stars.config import NeuronConfig
from stars.neurons import build_neuron
from stars.neurons.membrane import (
    MembraneParams,
    MembraneTap,
    membrane_potential,
    soft_firing,
    soft_firing_map,
)


@st.composite
def neuron_configs(draw: st.DrawFn) -> NeuronConfig:
    hard = draw(st.booleans())
    v_threshold = draw(st.floats(0.25, 2.0))
    return NeuronConfig(
        kind=draw(st.sampled_from(["lif", "if", "plif"])),
        tau=draw(st.floats(1.1, 8.0)),
        v_threshold=v_threshold,
        v_reset=draw(st.floats(-1.0, min(0.5, v_threshold), exclude_max=True)) if hard else None,
        decay_input=draw(st.booleans()),
        detach_reset=draw(st.booleans()),
        surrogate=draw(st.sampled_from(["atan", "sigmoid"])),
    )


@examples(60)
@given(
    cfg=neuron_configs(),
    backend=st.sampled_from(["auto", "torch"]),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 4.0),
)
def test_replayed_potential_reproduces_the_spikes(
    cfg: NeuronConfig, backend: Literal["auto", "torch"], steps: int, seed: int, scale: float
) -> None:
    """``H >= V_th`` gives back the spikes the neuron emitted, on the fused CPU operator and on
    spikingjelly's path, and H agrees with the reference equations.

    Error model (tests/neurons/parity.py): the replayed H and the float64 trajectory are each
    within the charge error ``e[t]`` of the exact potentials; where the trajectory comes that
    close to the threshold the neuron and the trajectory may fire differently and part, so
    both are compared up to each element's first such step.
    """
    neuron = build_neuron(cfg.model_copy(update={"backend": backend}))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, 3, 5, generator=gen) * scale + 0.3 * scale
    with MembraneTap([neuron]) as tap:
        spikes = neuron(x)
        h = tap[neuron]
        assert torch.equal(tap.spikes(neuron), spikes)
    params = MembraneParams.of(neuron)
    p = Neuron(
        params.tau,
        params.decay_input,
        params.v_threshold,
        params.v_reset,
        cfg.detach_reset,
        cfg.surrogate,
        cfg.surrogate_alpha,
    )
    truth = trajectory(x, p)
    clean = clean_steps(x, truth, p, U32)
    tol = charge_error(x, truth, p, U32) + charge_error(x, truth, p, U64)
    assert bool(((h.double() - truth.h).abs() <= tol)[clean].all())
    fired = h >= params.v_threshold
    if backend == "auto" and cfg.kind != "plif":
        # the fused operator: the replay is the same float32 computation
        assert torch.equal(fired, spikes.bool())
    else:
        assert torch.equal(fired[clean], spikes.bool()[clean])


def test_gradient_is_the_linear_recurrence_with_spikes_fixed() -> None:
    """For LIF with decay_input, ``dH[t]/dX[t'] = (1/tau) prod (1 - 1/tau)(1 - S)`` between
    them (hard reset): checked against autograd on a neuron that never fires and one that
    fires at the first step (the reset cuts the carry)."""
    tau = 2.0
    p = MembraneParams(tau=tau, decay_input=True, v_threshold=1.0, v_reset=0.0)
    x = torch.tensor([[[0.5]], [[0.1]], [[0.1]]], requires_grad=True)  # T=3, never fires
    silent = torch.zeros_like(x)
    h = membrane_potential(x, silent, p)
    (g,) = torch.autograd.grad(h[2].sum(), x)
    expected = torch.tensor([(1 / tau) * (1 - 1 / tau) ** 2, (1 / tau) * (1 - 1 / tau), 1 / tau])
    assert torch.equal(g.flatten(), expected)  # products of 1/2 and 0.1 * 0: exact
    fired_first = torch.tensor([[[1.0]], [[0.0]], [[0.0]]])
    h = membrane_potential(x, fired_first, p)
    (g,) = torch.autograd.grad(h[2].sum(), x)
    assert g.flatten()[0] == 0.0  # the reset to V_r forgets X[0]
    assert g.flatten()[2] == 1 / tau  # exact


def test_tap_removes_hooks_and_drops_captures_also_on_error() -> None:
    neuron = build_neuron(NeuronConfig())
    tap = MembraneTap([neuron])

    def body() -> None:
        with tap:
            neuron(torch.randn(2, 3, 4))
            assert neuron in tap and len(tap) == 1
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        body()
    assert not tap.active
    assert len(neuron._forward_hooks) == 0
    with pytest.raises(KeyError, match="has not been captured"):
        tap[neuron]
    with pytest.raises(TypeError, match="MultiStepNeuron"):
        MembraneTap([torch.nn.ReLU()])
    with pytest.raises(ValueError, match="twice"):
        MembraneTap([neuron, neuron])


def test_tap_keeps_the_graph_to_the_input() -> None:
    neuron = build_neuron(NeuronConfig(v_threshold=0.5))
    x = (torch.randn(4, 8, 6) + 0.5).requires_grad_(True)
    with MembraneTap([neuron]) as tap:
        neuron(x)
        q = soft_firing(tap[neuron], 0.5, 0.1).mean()
    (g,) = torch.autograd.grad(q, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@examples(50)
@given(
    seed=st.integers(0, 2**16),
    v_threshold=st.floats(0.1, 2.0),
    tau=st.floats(1e-3, 10.0),
)
def test_soft_firing_bounds_and_limit(seed: int, v_threshold: float, tau: float) -> None:
    """In ``[0, 1]``, 1/2 at the threshold, and within ``exp(-d / tau)`` of the spike for a
    potential at distance ``d`` from the threshold (the sigmoid's tail bound)."""
    h = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = soft_firing(h, v_threshold, tau)
    assert ((q >= 0) & (q <= 1)).all()
    spikes = (h >= v_threshold).double()
    bound = torch.exp(-(h - v_threshold).abs() / tau)
    # float64: z = (h - v_th) / tau is off by 2 u |z| (+ u), which moves the sigmoid (slope
    # <= 1/4) by u |z| / 2; the sigmoid and the bound round by a few u more.
    z = (h - v_threshold).abs() / tau
    assert ((q - spikes).abs() <= bound + U64 * (z + 8)).all()
    assert float(soft_firing(torch.tensor([v_threshold]), v_threshold, tau)) == 0.5
    with pytest.raises(ValueError, match="tau"):
        soft_firing(h, v_threshold, 0.0)
    assert math.isfinite(float(soft_firing(torch.tensor([1e30, -1e30]), v_threshold, tau).sum()))


@examples(40)
@given(
    cfg=neuron_configs(),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 3.0),
    tau=st.floats(0.02, 1.0),
)
def test_fused_firing_map_is_the_autograd_one(
    cfg: NeuronConfig, steps: int, seed: int, scale: float, tau: float
) -> None:
    """``soft_firing_map`` (the lean autograd function) against the plain composition
    ``soft_firing(membrane_potential(...)).mean((0, 2))``, value and gradient, in float64.

    Error model: both compute the same recurrence of ``<= 2T`` operations on values of size
    ``<= M = |x|_max + |V_r| + V_th`` per step and the same sigmoid, in a different order; each
    is within ``T * 8 u M / tau`` of the exact map (the sigmoid's slope is ``<= 1 / (4 tau)``)
    and of the exact gradient scaled by ``|g|_max / tau^2`` (the sigmoid's second derivative is
    ``<= 0.1 / tau^2``), so they agree within twice that (float64, ``u = 2^-53``).
    """
    neuron = build_neuron(cfg.model_copy(update={"backend": "torch"}))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(steps, 3, 4, 2, 2, generator=gen, dtype=torch.float64) * scale).requires_grad_(
        True
    )
    with torch.no_grad():
        spikes = neuron(x.float()).double()
    params = MembraneParams.of(neuron)
    m = float(x.detach().abs().max()) + abs(params.v_reset or 0.0) + params.v_threshold
    g = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64)
    ref = soft_firing(membrane_potential(x, spikes, params), params.v_threshold, tau).mean((0, 2))
    new = soft_firing_map(x, spikes, params, tau=tau)
    tol = 2 * steps * 8 * U64 * m / tau
    assert new.shape == (3, 2, 2)
    assert ((new - ref).abs() <= tol).all()
    (g_ref,) = torch.autograd.grad((ref * g).sum(), x)
    (g_new,) = torch.autograd.grad((new * g).sum(), x)
    gtol = tol * float(g.abs().max()) / tau + 1e-15
    assert ((g_new - g_ref).abs() <= gtol + 1e-12 * float(g_ref.abs().max())).all()
    with pytest.raises(ValueError, match="tau"):
        soft_firing_map(x, spikes, params, tau=0.0)
