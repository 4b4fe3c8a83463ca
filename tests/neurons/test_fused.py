"""The memory-lean CPU operator (``stars.neurons.fused``): memory, dtypes, threshold changes.
Its parity with spikingjelly's path and the reference neuron: ``test_parity.py``."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from error_model import U32

from neurons.parity import Neuron, clean_steps, trajectory
from stars.config import NeuronConfig
from stars.neurons import build_neuron
from stars.neurons.fused import FusedNeuronParams, fused_multi_step

Kind = Literal["lif", "if"]


def _saved_bytes(fn: object, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn(x)`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)  # type: ignore[operator]
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["lif", "if"])
def test_saves_only_the_input(kind: Kind) -> None:
    """Backward keeps the input alone (a broadcast input: its 1/T storage), several times
    less than spikingjelly's CPU path keeps."""
    cfg = NeuronConfig(kind=kind)
    x = torch.randn(4, 8, 16, 8, 8, requires_grad=True)
    lean = _saved_bytes(build_neuron(cfg), x)
    assert lean == x.untyped_storage().nbytes()
    sj = _saved_bytes(build_neuron(cfg.model_copy(update={"backend": "torch"})), x)
    assert sj >= 2 * lean
    image = torch.randn(8, 16, 8, 8, requires_grad=True)
    assert _saved_bytes(build_neuron(cfg), image.expand(4, *image.shape)) == image.nbytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    """Spikes come out in the input dtype; the membrane runs in float32 (float64 for
    float64), so half inputs give the spikes of their float32 values."""
    x = (torch.randn(5, 3, 7, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    p = FusedNeuronParams(2.0, True, 1.0, 0.0, False, "atan", 2.0)
    spikes = fused_multi_step(x, p)
    assert spikes.dtype == dtype
    # Equal spikes: no potential of this input is within float32 rounding of the threshold
    # (the error model of tests/neurons/parity.py), so float32 and float64 membranes agree.
    neuron = Neuron(2.0, True, 1.0, 0.0, False, "atan", 2.0)
    assert clean_steps(x, trajectory(x, neuron), neuron, U32).all()
    assert torch.equal(spikes.double(), fused_multi_step(x.double(), p))


def test_threshold_change_applies_on_the_next_call() -> None:
    neuron = build_neuron(NeuronConfig(kind="if"))
    x = torch.full((1, 1, 4), 1.5)
    assert neuron(x).sum() == 4
    neuron.v_threshold = 2.0
    assert neuron(x).sum() == 0


def _if_neuron(v_threshold: float = 1.0) -> FusedNeuronParams:
    return FusedNeuronParams(None, True, v_threshold, 0.0, False, "atan", 2.0)


def test_the_membrane_is_float32_for_float32_inputs_as_in_spikingjelly() -> None:
    """Two inputs whose exact sum is 1 - 2^-25 (halfway between two float32 values) reach
    the threshold 1 only when the IF membrane rounds like float32: 0.5 + (0.5 - 2^-25)
    rounds to 1.0 (ties to even). spikingjelly computes in the input dtype, so it fires at
    t = 1; a float64 membrane would not (1 - 2^-25 < 1)."""
    x = torch.tensor([0.5, 0.5 - 2.0**-25], dtype=torch.float32).view(2, 1)
    assert float(x[1]) == 0.5 - 2.0**-25  # representable: float32 steps by 2^-26 below 0.5
    sj = build_neuron(NeuronConfig(kind="if", backend="torch"))(x)
    assert sj.flatten().tolist() == [0.0, 1.0]
    assert fused_multi_step(x, _if_neuron()).flatten().tolist() == [0.0, 1.0]


def test_the_membrane_is_float64_for_float64_inputs() -> None:
    """An input 1e-12 below the threshold does not fire in float64; in float32 it rounds to
    1.0 and would (float32's step at 1 is 6e-8)."""
    x = torch.tensor([[1.0 - 1e-12]], dtype=torch.float64)
    assert fused_multi_step(x, _if_neuron()).item() == 0.0
    assert fused_multi_step(x.float(), _if_neuron()).item() == 1.0


def test_a_potential_exactly_at_the_threshold_fires() -> None:
    """Heaviside(0) = 1, as spikingjelly's ``x >= 0``: H = V_th fires."""
    x = torch.tensor([[0.75]], dtype=torch.float32)
    sj = build_neuron(NeuronConfig(kind="if", v_threshold=0.75, backend="torch"))(x)
    assert sj.item() == 1.0
    assert fused_multi_step(x, _if_neuron(0.75)).item() == 1.0
