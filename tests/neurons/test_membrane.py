"""The membrane tap: charged potentials replayed from a neuron's input and spikes."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stars.config import NeuronConfig
from stars.neurons import build_neuron
from stars.neurons.membrane import MembraneParams, MembraneTap, membrane_potential, soft_firing


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


def _reference_potentials(x_seq: torch.Tensor, p: MembraneParams) -> torch.Tensor:
    """H from the reference neuron's equations, run in float64 (independent of the replay:
    it thresholds its own H instead of reading spikes)."""
    x = x_seq.double()
    vr = 0.0 if p.v_reset is None else p.v_reset
    v = torch.full_like(x[0], vr)
    out = []
    for xt in x:
        if p.tau is None:
            h = v + xt
        elif p.decay_input:
            h = v + (xt - (v - vr)) / p.tau
        else:
            h = v - (v - vr) / p.tau + xt
        s = (h >= p.v_threshold).double()
        v = h - s * p.v_threshold if p.v_reset is None else s * vr + (1 - s) * h
        out.append(h)
    return torch.stack(out)


@settings(max_examples=60, deadline=None)
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

    Error model: H is a float32 sum of at most ``T`` terms of size ``<= |x| + |V_r| + V_th``
    (below 30 here), so it differs from the float64 reference by ``<= T * 30 * 2^-23 < 3e-5``;
    a spike can differ only where ``|H - V_th|`` is within that (counted and excluded).
    """
    neuron = build_neuron(cfg.model_copy(update={"backend": backend}))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, 3, 5, generator=gen) * scale + 0.3 * scale
    with MembraneTap([neuron]) as tap:
        spikes = neuron(x)
        h = tap[neuron]
        assert torch.equal(tap.spikes(neuron), spikes)
    params = MembraneParams.of(neuron)
    ref = _reference_potentials(x, params)
    tol = steps * 30 * 2.0**-23
    near = (ref - params.v_threshold).abs() <= tol
    # the reference follows its own spikes; where one is within rounding of the threshold the
    # trajectories may part, so compare only up to the first such step per element
    clean = ~(near.cumsum(0) > 0)
    assert torch.allclose(h.double()[clean], ref[clean], atol=tol, rtol=0)
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
    assert torch.allclose(g.flatten(), expected)
    fired_first = torch.tensor([[[1.0]], [[0.0]], [[0.0]]])
    h = membrane_potential(x, fired_first, p)
    (g,) = torch.autograd.grad(h[2].sum(), x)
    assert g.flatten()[0] == 0.0  # the reset to V_r forgets X[0]
    assert g.flatten()[2] == pytest.approx(1 / tau)


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


@settings(max_examples=50, deadline=None)
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
    assert ((q - spikes).abs() <= bound + 1e-12).all()
    assert float(soft_firing(torch.tensor([v_threshold]), v_threshold, tau)) == 0.5
    with pytest.raises(ValueError, match="tau"):
        soft_firing(h, v_threshold, 0.0)
    assert math.isfinite(float(soft_firing(torch.tensor([1e30, -1e30]), v_threshold, tau).sum()))
