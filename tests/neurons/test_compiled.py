"""The compiled CPU operator (``compile: true``: :func:`stars.neurons.fused.compiled_multi_step`).

It computes the function of the eager operator with its own functional code, compiled by
inductor, so it is held to the same float64 truth and error model (``tests/neurons/parity.py``,
which holds for any order of the sums). Each structure (IF or LIF, hard or soft reset,
detached or not, ATan or Sigmoid) compiles once per dtype; the float constants are drawn
freely, as they do not recompile. Four structures cover every branch of the kernels.
"""

from __future__ import annotations

from typing import Any, Literal

import pytest
import torch
from error_model import U32, U64
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import nn

from neurons.parity import Neuron, expectation
from stars.neurons.fused import (
    FusedNeuronParams,
    compiled_multi_step,
    fused_multi_step,
)

STRUCTURES: dict[str, dict[str, Any]] = {
    "lif-decay-hard-atan": dict(lif=True, decay_input=True, hard=True, detach=False, atan=True),
    "lif-soft-detached-sigmoid": dict(
        lif=True, decay_input=False, hard=False, detach=True, atan=False
    ),
    "if-hard-detached-sigmoid": dict(
        lif=False, decay_input=False, hard=True, detach=True, atan=False
    ),
    "if-soft-atan": dict(lif=False, decay_input=False, hard=False, detach=False, atan=True),
}


@st.composite
def neurons(draw: st.DrawFn, structure: dict[str, Any]) -> FusedNeuronParams:
    v_threshold = draw(st.floats(0.25, 2.0))
    surrogate: Literal["atan", "sigmoid"] = "atan" if structure["atan"] else "sigmoid"
    return FusedNeuronParams(
        tau=draw(st.floats(1.1, 8.0)) if structure["lif"] else None,
        decay_input=structure["decay_input"],
        v_threshold=v_threshold,
        v_reset=draw(st.floats(-1.0, min(0.5, v_threshold), exclude_max=True))
        if structure["hard"]
        else None,
        detach_reset=structure["detach"],
        surrogate=surrogate,
        alpha=draw(st.floats(0.5, 8.0)),
    )


def _grad(
    op: Any, p: FusedNeuronParams, base: torch.Tensor, steps: int, upstream: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = base.detach().requires_grad_(True)
    spikes = op(x.expand(steps, *x.shape) if x.ndim == upstream.ndim - 1 else x, p)
    (grad,) = torch.autograd.grad((spikes * upstream.to(spikes.dtype)).sum(), x)
    return spikes, grad


STEPS = 4
"""T is compiled in (the recurrence is unrolled), so the tests fix it, as a model does."""


@pytest.mark.parametrize(
    ("structure", "broadcast"),
    [(name, False) for name in STRUCTURES] + [("lif-decay-hard-atan", True)],
)
@examples(8)
@given(data=st.data(), seed=st.integers(0, 2**16), scale=st.floats(0.1, 4.0))
def test_agrees_with_the_float64_truth(
    structure: str, broadcast: bool, data: st.DataObject, seed: int, scale: float
) -> None:
    """float32 inputs: the float64 trajectory's spikes up to each element's first near step,
    and the float64 reference's input gradient within the float32 error model on elements
    with no near step (an input broadcast over time: the direct encoder's case)."""
    steps = STEPS
    p = data.draw(neurons(STRUCTURES[structure]))
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 5) if broadcast else (steps, 3, 5)
    base = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + 0.3 * scale).float()
    upstream = torch.randn(steps, 3, 5, generator=gen, dtype=torch.float64).float()
    want = expectation(base, steps, upstream, Neuron(**vars(p)), U32)
    spikes, grad = _grad(compiled_multi_step, p, base, steps, upstream)
    assert spikes.dtype == torch.float32
    assert torch.equal(spikes.double()[want.clean], want.truth.s[want.clean])
    err = (grad.double() - want.exact).abs()
    assert bool((err[want.whole] <= want.tol[want.whole]).all()), float((err - want.tol).max())


@examples(8)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 4.0))
def test_bf16_inputs_run_the_float32_membrane(seed: int, scale: float) -> None:
    """bf16 inputs: the spikes of the same values in float32 (bf16 -> float32 is exact and
    the membrane is float32), and each step's gradient is the float32 one rounded once to
    bf16: both bitwise, as it is the same float32 computation."""
    p = FusedNeuronParams(2.0, True, 0.5, 0.0, False, "atan", 2.0)
    steps = STEPS
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(steps, 4, 6, generator=gen) * scale + 0.3 * scale).bfloat16()
    upstream = torch.randn(steps, 4, 6, generator=gen).bfloat16()
    spikes, grad = _grad(compiled_multi_step, p, base, steps, upstream)
    ref_spikes, ref_grad = _grad(compiled_multi_step, p, base.float(), steps, upstream.float())
    assert spikes.dtype == grad.dtype == torch.bfloat16
    assert torch.equal(spikes.float(), ref_spikes)
    assert torch.equal(grad, ref_grad.bfloat16())


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_a_new_threshold_does_not_recompile() -> None:
    """The constants travel as a tensor: a threshold changed at run time (and a new size)
    reuses the compiled kernels, and the spikes follow the new threshold (they equal the
    eager operator's, whose threshold is a Python float)."""
    x = torch.randn(4, 6, 7, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    p = FusedNeuronParams(2.0, True, 0.5, 0.0, False, "atan", 2.0)
    torch.autograd.backward(compiled_multi_step(x, p).sum())
    before = _unique_graphs()
    for v_threshold, n in ((0.3, 6), (0.8, 9)):
        q = FusedNeuronParams(2.0, True, v_threshold, 0.0, False, "atan", 2.0)
        y = torch.randn(4, n, 7, generator=torch.Generator().manual_seed(n)).requires_grad_(True)
        spikes = compiled_multi_step(y, q)
        torch.autograd.backward(spikes.sum())
        assert torch.equal(spikes, fused_multi_step(y.detach(), q))
    assert _unique_graphs() == before


def test_backward_keeps_only_the_input() -> None:
    """Like the eager operator: the input (and the five constants) is all autograd keeps."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    p = FusedNeuronParams(2.0, True, 1.0, 0.0, False, "atan", 2.0)
    x = torch.randn(4, 8, 16, 8, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compiled_multi_step(x, p)
    assert sum(storages.values()) == x.untyped_storage().nbytes() + 5 * 4


def test_a_failing_compiler_falls_back_to_the_same_function_eagerly(
    broken_compile: None,
) -> None:
    p = FusedNeuronParams(2.0, True, 0.5, 0.0, False, "sigmoid", 4.0)
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="torch.compile failed for the neuron kernel"):
        spikes, grad = _grad(compiled_multi_step, p, x, 3, upstream)
    want = expectation(x, 3, upstream, Neuron(**vars(p)), U64)
    assert torch.equal(spikes[want.clean], want.truth.s[want.clean])
    err = (grad - want.exact).abs()
    assert bool((err[want.whole] <= want.tol[want.whole]).all())


class _Scaled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = FusedNeuronParams(2.0, True, 0.5, 0.0, False, "atan", 2.0)
        return compiled_multi_step(x * 2.0, p) * 3.0


def test_opaque_inside_a_compiled_graph() -> None:
    """Under a model-wide ``torch.compile`` (the GPU path) the operator is one opaque call:
    the graph around it only scales by powers of two, so spikes and gradients equal the
    eager module's bitwise."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 6, generator=gen)
    upstream = torch.randn(4, 2, 6, generator=gen)
    outs = []
    for module in (_Scaled(), torch.compile(_Scaled(), dynamic=False)):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (grad,) = torch.autograd.grad((out * upstream).sum(), xi)
        outs.append((out, grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
