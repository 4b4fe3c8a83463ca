"""Parity of the neurons' numerical paths: stars' fused CPU operator, spikingjelly's PyTorch
path and the reference neuron agree at every supported dtype (float32, float64; bf16 inputs
with a float32 membrane) and under bf16 autocast. Error model: ``tests/neurons/parity.py``."""

from __future__ import annotations

from typing import Literal, cast

import pytest
import torch
from error_model import U32, U64
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import nn

from neurons.parity import (
    Neuron,
    clean_steps,
    expectation,
    gradient_tolerance,
    reference_neuron,
    trajectory,
)
from stars.config import NeuronConfig
from stars.neurons import MultiStepNeuron, ReferenceNeuron, build_neuron

Kind = Literal["lif", "if", "plif"]
Surrogate = Literal["atan", "sigmoid"]
U_BF16 = 2.0**-8
"""Unit roundoff of bfloat16 (8 significant bits)."""


@st.composite
def configs(draw: st.DrawFn, kind: Kind, hard_reset: bool, surrogate: Surrogate) -> NeuronConfig:
    v_threshold = draw(st.floats(0.25, 2.0))
    return NeuronConfig(
        kind=kind,
        tau=draw(st.floats(1.1, 8.0)),
        v_threshold=v_threshold,
        v_reset=draw(st.floats(-1.0, min(0.5, v_threshold), exclude_max=True))
        if hard_reset
        else None,
        decay_input=draw(st.booleans()),
        detach_reset=draw(st.booleans()),
        surrogate=surrogate,
        surrogate_alpha=draw(st.floats(0.5, 8.0)),
    )


def _constants(cfg: NeuronConfig, neuron: MultiStepNeuron) -> Neuron:
    # PLIF: its decay is sigmoid(w) of a float32 parameter; neuron.tau is 1 / that, exactly
    # the float64 value the reference must use
    return Neuron(
        tau=neuron.tau,
        decay_input=cfg.decay_input,
        v_threshold=cfg.v_threshold,
        v_reset=cfg.v_reset,
        detach_reset=cfg.detach_reset,
        surrogate=cfg.surrogate,
        alpha=cfg.surrogate_alpha,
    )


def _run(
    neuron: nn.Module, base: torch.Tensor, steps: int, upstream: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = base.detach().requires_grad_(True)
    spikes = neuron(x.expand(steps, *x.shape) if x.ndim == upstream.ndim - 1 else x)
    (grad,) = torch.autograd.grad((spikes * upstream.to(spikes.dtype)).sum(), x)
    return spikes, grad


@pytest.mark.parametrize("kind", ["lif", "if", "plif"])
@pytest.mark.parametrize("hard_reset", [True, False])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@examples(10)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    steps=st.integers(1, 6),
    batch=st.integers(1, 3),
    features=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 4.0),
    broadcast=st.booleans(),
)
def test_every_path_agrees_with_the_float64_truth(
    kind: Kind,
    hard_reset: bool,
    surrogate: Surrogate,
    data: st.DataObject,
    dtype: torch.dtype,
    steps: int,
    batch: int,
    features: int,
    seed: int,
    scale: float,
    broadcast: bool,
) -> None:
    """Fused (``auto``; PLIF: spikingjelly's operator), spikingjelly's PyTorch path
    (``torch``) and the reference neuron, each in ``dtype``: the same spikes as the float64
    trajectory up to each element's first near-threshold step, and the float64 reference's
    input gradient within the error model on elements with no such step."""
    cfg = data.draw(configs(kind, hard_reset, surrogate))
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, features) if broadcast else (steps, batch, features)
    base = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + 0.3 * scale).to(dtype)
    upstream = torch.randn(steps, batch, features, generator=gen, dtype=torch.float64).to(dtype)
    fused = build_neuron(cfg)
    p = _constants(cfg, fused)
    u = U32 if dtype == torch.float32 else U64
    want = expectation(base, steps, upstream, p, u)
    paths: dict[str, nn.Module] = {
        "fused": fused,
        "spikingjelly": build_neuron(cfg.model_copy(update={"backend": "torch"})),
        "reference": reference_neuron(p),
    }
    for name, neuron in paths.items():
        spikes, grad = _run(neuron, base, steps, upstream)
        assert spikes.dtype == dtype, name
        assert torch.equal(spikes.double()[want.clean], want.truth.s[want.clean]), name
        err = (grad.double() - want.exact).abs()
        ok = err[want.whole] <= want.tol[want.whole]
        assert bool(ok.all()), (name, float((err - want.tol).max()))


@st.composite
def any_configs(draw: st.DrawFn) -> NeuronConfig:
    return draw(
        configs(
            draw(st.sampled_from(["lif", "if", "plif"])),
            draw(st.booleans()),
            draw(st.sampled_from(["atan", "sigmoid"])),
        )
    )


@examples(40)
@given(
    cfg=any_configs(),
    backend=st.sampled_from(["auto", "torch"]),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 4.0),
    broadcast=st.booleans(),
)
def test_bf16_inputs_run_the_float32_membrane(
    cfg: NeuronConfig,
    backend: Literal["auto", "torch"],
    steps: int,
    seed: int,
    scale: float,
    broadcast: bool,
) -> None:
    """bf16 inputs: the spikes are those of the same values in float32, in bf16, and the
    gradient is the float32 one rounded once to bf16.

    Error model: bf16 -> float32 is exact and the membrane is float32 for bf16 inputs, so it
    is the same float32 computation: spikes bitwise equal, and each step's gradient is the
    float32 one rounded to bf16 (bitwise that). An input broadcast over time sums the T
    steps' gradients in bf16: each rounded (2^-8 relative) and the sum rounded once more, at
    most (T + 1) 2^-8 times the sum of their magnitudes.
    """
    neuron = build_neuron(cfg.model_copy(update={"backend": backend}))
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 5) if broadcast else (steps, 3, 5)
    base = (torch.randn(shape, generator=gen) * scale + 0.3 * scale).bfloat16()
    upstream = torch.randn(steps, 3, 5, generator=gen).bfloat16()
    spikes, grad = _run(neuron, base, steps, upstream)
    ref_spikes, ref_grad = _run(neuron, base.float(), steps, upstream.float())
    assert spikes.dtype == torch.bfloat16
    assert grad.dtype == torch.bfloat16
    assert torch.equal(spikes.float(), ref_spikes)
    if not broadcast:
        assert torch.equal(grad, ref_grad.bfloat16())
    else:
        _, per_step = _run(neuron, base.float().expand(steps, 3, 5), steps, upstream.float())
        bound = (steps + 1) * U_BF16 * per_step.abs().sum(0)
        assert bool(((grad.float() - ref_grad).abs() <= bound).all())
    # bf16 autocast: the neuron's elementwise ops are not autocast; the same results, bitwise,
    # for bf16 inputs and for float32 ones.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_spikes, auto_grad = _run(neuron, base, steps, upstream)
        auto_f32, auto_f32_grad = _run(neuron, base.float(), steps, upstream.float())
    assert torch.equal(auto_spikes, spikes) and torch.equal(auto_grad, grad)
    assert torch.equal(auto_f32, ref_spikes) and torch.equal(auto_f32_grad, ref_grad)


_COMPILED: list[tuple[MultiStepNeuron, nn.Module]] = []


def _compiled_lif() -> tuple[MultiStepNeuron, nn.Module]:
    """One eager LIF layer and its ``torch.compile``d twin (compiled once per session)."""
    if not _COMPILED:
        eager = build_neuron(NeuronConfig(kind="lif", v_threshold=0.5))
        compiled = cast(nn.Module, torch.compile(eager, dynamic=False))
        _COMPILED.append((eager, compiled))
    return _COMPILED[0]


@examples(8)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 4.0))
def test_the_compiled_neuron_agrees_with_the_float64_truth(seed: int, scale: float) -> None:
    """The compile path of the performance work (``compile: true``): the compiled neuron's
    spikes equal the float64 trajectory on every clean step and its input gradient is within
    the same error model as the eager paths (inductor may reorder the charge's sums: the model
    holds for any order). One fixed shape, so it compiles once."""
    eager, compiled = _compiled_lif()
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64) * scale + 0.3 * scale
    upstream = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    p = _constants(NeuronConfig(kind="lif", v_threshold=0.5), eager)
    truth = trajectory(base, p)
    clean = clean_steps(base, truth, p, U32)
    whole = clean.all(0).expand(4, 3, 5)
    tol = gradient_tolerance(base, upstream, truth, p, U32) + gradient_tolerance(
        base, upstream, truth, p, U64
    )
    reference = ReferenceNeuron(
        "lif", tau=p.tau or 2.0, v_threshold=p.v_threshold, v_reset=p.v_reset
    )
    _, exact = _run(reference, base, 4, upstream)
    spikes, grad = _run(compiled, base.float(), 4, upstream.float())
    assert torch.equal(spikes.double()[clean], truth.s[clean])
    err = (grad.double() - exact).abs()
    assert bool((err[whole] <= tol[whole]).all()), float((err - tol).max())
