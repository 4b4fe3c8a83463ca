"""Property tests of the spiking neurons: spikingjelly adapters against the reference LIF."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import pytest
import torch
from error_model import U32
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

from neurons.parity import Neuron, clean_steps, trajectory
from stars.config import NeuronConfig
from stars.neurons import (
    MultiStepNeuron,
    ReferenceNeuron,
    SpikingNeuron,
    TorchPathSurrogate,
    atan_spike,
    build_neuron,
    build_surrogate,
    reference_multi_step,
    sigmoid_spike,
    surrogate_primitive,
)

FAST = examples(25)


def _constants(cfg: NeuronConfig, neuron: MultiStepNeuron) -> Neuron:
    return Neuron(
        neuron.tau,
        cfg.decay_input,
        cfg.v_threshold,
        cfg.v_reset,
        cfg.detach_reset,
        cfg.surrogate,
        cfg.surrogate_alpha,
    )


Kind = Literal["lif", "if", "plif"]
Surrogate = Literal["atan", "sigmoid"]


@st.composite
def neuron_configs(
    draw: st.DrawFn,
    kinds: tuple[Kind, ...] = ("lif", "if", "plif"),
    hard_reset: bool | None = None,
    surrogates: tuple[Surrogate, ...] = ("atan", "sigmoid"),
) -> NeuronConfig:
    """Any valid NeuronConfig (backend auto or torch: both run on CPU); some fields pinned."""
    hard = draw(st.booleans()) if hard_reset is None else hard_reset
    return NeuronConfig(
        kind=draw(st.sampled_from(kinds)),
        tau=draw(st.floats(1.1, 8.0)),
        v_threshold=draw(st.floats(0.25, 2.0)),
        v_reset=draw(st.floats(-1.0, 0.0)) if hard else None,
        decay_input=draw(st.booleans()),
        detach_reset=draw(st.booleans()),
        surrogate=draw(st.sampled_from(surrogates)),
        surrogate_alpha=draw(st.floats(0.5, 8.0)),
        backend=draw(st.sampled_from(["auto", "torch"])),
    )


def _inputs(seed: int, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale + 0.3 * scale).requires_grad_(True)


shapes = st.tuples(st.integers(1, 6), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3))


@FAST
@given(cfg=neuron_configs(), shape=shapes, seed=st.integers(0, 2**16), scale=st.floats(0.1, 4.0))
def test_spikes_binary_and_shape_preserved(
    cfg: NeuronConfig, shape: tuple[int, ...], seed: int, scale: float
) -> None:
    neuron = build_neuron(cfg)
    x_seq = _inputs(seed, shape, scale)
    spikes = neuron(x_seq)
    assert spikes.shape == x_seq.shape
    assert spikes.dtype == x_seq.dtype
    assert bool(((spikes == 0) | (spikes == 1)).all())


@examples(40)
@given(
    fraction=st.floats(0.01, 1.0),
    v_threshold=st.floats(0.25, 2.0),
    steps=st.integers(1, 32),
    backend=st.sampled_from(["auto", "torch"]),
)
def test_if_constant_current_rate(
    fraction: float, v_threshold: float, steps: int, backend: Literal["auto", "torch"]
) -> None:
    """Soft-reset IF driven by c in (0, v_th] fires floor(T c / v_th) times, up to rounding."""
    neuron = build_neuron(
        NeuronConfig(kind="if", v_threshold=v_threshold, v_reset=None, backend=backend)
    )
    current = fraction * v_threshold
    spikes = neuron(torch.full((steps, 2, 3), current))
    rate = spikes.mean(dim=0)
    # Exactly, the count is floor(T c / v_th), within 1 / T of the rate c / v_th. float32: the
    # charge after t steps is off by <= 6 t u (c + v_th) (tests/neurons/parity.py), which can
    # move a crossing only when T c / v_th is that close to an integer: one spike fewer, off
    # by 1 / T plus that much; the rate's own rounding is u.
    slack = 6 * steps * U32 * (fraction + 1) + U32
    assert bool(((rate - fraction).abs() <= 1.0 / steps + slack).all())


@FAST
@given(cfg=neuron_configs(), seed=st.integers(0, 2**16))
def test_no_state_leak_between_calls(cfg: NeuronConfig, seed: int) -> None:
    neuron = build_neuron(cfg)
    x_a = _inputs(seed, (4, 3, 5), 2.0)
    x_b = _inputs(seed + 1, (4, 2, 7), 2.0)

    first = neuron(x_a)
    first.sum().backward()
    neuron(x_b).sum().backward()  # a different batch shape in between
    second = neuron(x_a)
    second.sum().backward()  # no graph is shared with the first call
    assert torch.equal(first, second)


@FAST
@given(
    surrogate=st.sampled_from(["atan", "sigmoid"]),
    alpha=st.floats(0.1, 50.0),
    magnitude=st.floats(1e-3, 1e6),
    seed=st.integers(0, 2**16),
)
def test_surrogate_gradients_finite(
    surrogate: Surrogate, alpha: float, magnitude: float, seed: int
) -> None:
    neuron = build_neuron(NeuronConfig(surrogate=surrogate, surrogate_alpha=alpha))
    x_seq = _inputs(seed, (4, 2, 8), magnitude)
    (grad,) = torch.autograd.grad(neuron(x_seq).sum(), x_seq)
    assert bool(torch.isfinite(grad).all())


@FAST
@given(
    surrogate=st.sampled_from(["atan", "sigmoid"]),
    alpha=st.floats(0.5, 8.0),
    seed=st.integers(0, 2**16),
)
def test_surrogates_are_derivatives_of_their_primitives(
    surrogate: Surrogate, alpha: float, seed: int
) -> None:
    x = _inputs(seed, (64,), 2.0)
    spike_fn = atan_spike if surrogate == "atan" else sigmoid_spike
    spikes = spike_fn(x, alpha)
    assert torch.equal(spikes, (x >= 0).float())
    (ours,) = torch.autograd.grad(spikes.sum(), x)
    (primitive,) = torch.autograd.grad(surrogate_primitive(x, surrogate, alpha).sum(), x)
    (theirs,) = torch.autograd.grad(build_surrogate(surrogate, alpha)(x).sum(), x)
    # Each form rounds g'(x) a few times: <= 8 u relative, and Sigmoid's alpha s (1 - s) also
    # 2 alpha u absolute (1 - s cancels); two forms are within twice that of each other.
    rtol, atol = 16 * U32, 4 * alpha * U32 if surrogate == "sigmoid" else 0.0
    torch.testing.assert_close(ours, primitive, rtol=rtol, atol=atol)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["lif", "if", "plif"])
def test_half_precision_inputs_keep_a_float32_membrane(dtype: torch.dtype, kind: Kind) -> None:
    cfg = NeuronConfig(kind=kind)
    x_seq = _inputs(3, (8, 4, 16), 2.0).detach().to(dtype).requires_grad_(True)
    spikes = build_neuron(cfg)(x_seq)
    assert spikes.dtype == dtype
    spikes.sum().backward()
    assert x_seq.grad is not None
    assert x_seq.grad.dtype == dtype
    # The float32 membrane of the bf16 values: the float64 trajectory's spikes, up to each
    # element's first step within float32 rounding of the threshold (tests/neurons/parity.py).
    x = x_seq.detach().float()
    p = _constants(cfg, build_neuron(cfg))
    truth = trajectory(x, p)
    clean = clean_steps(x, truth, p, U32)
    assert torch.equal(spikes.double()[clean], truth.s[clean])
    assert clean.float().mean() > 0.99  # the comparison covers nearly every step


def test_plif_builds_runs_and_learns_tau() -> None:
    cfg = NeuronConfig(kind="plif", tau=3.0, v_reset=None)
    neuron = build_neuron(cfg)
    assert isinstance(neuron.node, sj_neuron.ParametricLIFNode)
    assert neuron.tau == pytest.approx(3.0, rel=4 * U32)  # 1 / sigmoid(w), w in float32
    x_seq = _inputs(0, (6, 4, 16), 2.0)
    spikes = neuron(x_seq)
    # At its initial tau PLIF is the reference LIF (1 / tau = sigmoid(w)): the float64
    # trajectory's spikes, up to each element's first near-threshold step.
    p = _constants(cfg, neuron)
    truth = trajectory(x_seq, p)
    clean = clean_steps(x_seq, truth, p, U32)
    assert torch.equal(spikes.double()[clean], truth.s[clean])
    assert clean.float().mean() > 0.99
    spikes.sum().backward()
    weights = list(neuron.parameters())
    assert len(weights) == 1
    assert weights[0].grad is not None
    assert bool(torch.isfinite(weights[0].grad).all())
    assert x_seq.grad is not None


@examples(40)
@given(cfg=neuron_configs(), backend=st.sampled_from(["auto", "torch", "cupy", "triton"]))
def test_build_neuron_honours_every_field(
    cfg: NeuronConfig, backend: Literal["auto", "torch", "cupy", "triton"]
) -> None:
    cfg = cfg.model_copy(update={"backend": backend})
    neuron = build_neuron(cfg)
    node: Any = neuron.node
    expected = {
        "lif": sj_neuron.LIFNode,
        "if": sj_neuron.IFNode,
        "plif": sj_neuron.ParametricLIFNode,
    }
    assert type(node) is expected[cfg.kind]
    assert neuron.kind == cfg.kind
    assert neuron.backend == cfg.backend
    assert neuron.v_threshold == cfg.v_threshold
    assert node.v_threshold == cfg.v_threshold
    assert neuron.v_reset == cfg.v_reset
    assert node.v_reset == cfg.v_reset
    assert node.detach_reset == cfg.detach_reset
    if cfg.kind == "if":
        assert neuron.tau is None
    else:
        assert neuron.tau == pytest.approx(cfg.tau, rel=4 * U32)  # PLIF: w in float32
        assert node.decay_input == cfg.decay_input
    surrogate = node.surrogate_function
    if cfg.backend == "torch":
        assert isinstance(surrogate, TorchPathSurrogate)
        surrogate = surrogate.inner
    surrogate_type = sj_surrogate.ATan if cfg.surrogate == "atan" else sj_surrogate.Sigmoid
    assert type(surrogate) is surrogate_type
    assert surrogate.alpha == cfg.surrogate_alpha


def test_satisfies_protocol_and_threshold_is_settable() -> None:
    neuron = build_neuron(NeuronConfig())
    assert isinstance(neuron, SpikingNeuron)
    neuron.v_threshold = 0.5
    assert neuron.node.v_threshold == 0.5
    spikes = neuron(torch.full((3, 1, 1), 0.5))
    expected = reference_multi_step(torch.full((3, 1, 1), 0.5), v_threshold=0.5)
    assert torch.equal(spikes, expected)


def test_rejects_input_without_time_and_batch() -> None:
    with pytest.raises(ValueError, match=r"\[T, N, \*\]"):
        build_neuron(NeuronConfig())(torch.zeros(4))


def test_torch_backend_needs_its_surrogate() -> None:
    node = sj_neuron.LIFNode(surrogate_function=sj_surrogate.ATan(), step_mode="m")
    with pytest.raises(ValueError, match="TorchPathSurrogate"):
        MultiStepNeuron(node, kind="lif", backend="torch")


def test_explicit_cuda_backend_warns_once_when_spikingjelly_picks_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def fake_implementation(kind: str, device: torch.device) -> dict[str, object]:
        calls.append(kind)
        return {"implementation": "cuda", "unavailable": {}}

    monkeypatch.setattr(
        "stars.neurons.spikingjelly_neurons.sj_functional.neuron_implementation",
        fake_implementation,
    )
    device = torch.device("cuda", 0)
    triton = build_neuron(NeuronConfig(backend="triton"))
    with pytest.warns(RuntimeWarning, match="SJ_LIF_CUDA_IMPLEMENTATION=triton"):
        triton._check_backend(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton._check_backend(device)  # checked once per device
        build_neuron(NeuronConfig(kind="if", backend="cupy"))._check_backend(device)  # matches
        build_neuron(NeuronConfig(backend="auto"))._check_backend(device)  # never checked
    assert calls == ["lif", "if"]


@FAST
@given(cfg=neuron_configs())
def test_reference_twin_of_a_config(cfg: NeuronConfig) -> None:
    """``ReferenceNeuron.from_config`` carries every field over; PLIF maps to LIF at its
    initial tau."""
    ref = ReferenceNeuron.from_config(cfg)
    assert ref.kind == ("if" if cfg.kind == "if" else "lif")
    assert (ref.tau, ref.v_threshold, ref.v_reset) == (cfg.tau, cfg.v_threshold, cfg.v_reset)
    assert (ref.decay_input, ref.detach_reset) == (cfg.decay_input, cfg.detach_reset)
    assert (ref.surrogate, ref.alpha) == (cfg.surrogate, cfg.surrogate_alpha)


def test_reference_defaults_and_primitive_values() -> None:
    """The documented defaults (LIF, tau 2, threshold 1, hard reset to 0, decay_input, ATan
    with alpha 2; Sigmoid's alpha 4), and the primitives' values: g(0) = 1/2, g -> 0 and 1."""
    x = (torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(9)) * 2).requires_grad_()
    explicit = {
        "kind": "lif",
        "tau": 2.0,
        "v_threshold": 1.0,
        "v_reset": 0.0,
        "decay_input": True,
        "detach_reset": False,
        "surrogate": "atan",
        "alpha": 2.0,
    }
    for default, given_ in (
        (reference_multi_step, lambda t: reference_multi_step(t, **explicit)),  # type: ignore[arg-type]
        (ReferenceNeuron(), ReferenceNeuron(**explicit)),  # type: ignore[arg-type]
        (atan_spike, lambda t: atan_spike(t, 2.0)),
        (sigmoid_spike, lambda t: sigmoid_spike(t, 4.0)),
    ):
        a, b = default(x), given_(x)
        assert torch.equal(a, b)
        (ga,) = torch.autograd.grad(a.sum(), x)
        (gb,) = torch.autograd.grad(b.sum(), x)
        assert torch.equal(ga, gb)
    # H = v_th exactly fires (Heaviside of 0 is 1)
    assert atan_spike(torch.zeros(2)).tolist() == sigmoid_spike(torch.zeros(2)).tolist() == [1, 1]
    z = torch.tensor([0.0, -1e30, 1e30])
    for kind in ("atan", "sigmoid"):
        assert surrogate_primitive(z, kind, 2.0).tolist() == [0.5, 0.0, 1.0]


def test_reference_refuses_an_unknown_kind_or_surrogate() -> None:
    x = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="kind"):
        reference_multi_step(x, kind="LIF")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="surrogate"):
        reference_multi_step(x, surrogate="tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        ReferenceNeuron("plif")(x)  # type: ignore[arg-type]
