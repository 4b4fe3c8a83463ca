"""stars.neurons: multi-step spiking neurons (spikingjelly 2.x adapters, a reference LIF)."""

from stars.neurons.factory import build_neuron
from stars.neurons.protocols import SpikingNeuron
from stars.neurons.reference import (
    ReferenceNeuron,
    atan_spike,
    reference_multi_step,
    sigmoid_spike,
    surrogate_primitive,
)
from stars.neurons.spikingjelly_neurons import (
    MultiStepNeuron,
    NeuronBackend,
    NeuronKind,
    SurrogateKind,
    TorchPathSurrogate,
    build_surrogate,
)

__all__ = [
    "MultiStepNeuron",
    "NeuronBackend",
    "NeuronKind",
    "ReferenceNeuron",
    "SpikingNeuron",
    "SurrogateKind",
    "TorchPathSurrogate",
    "atan_spike",
    "build_neuron",
    "build_surrogate",
    "reference_multi_step",
    "sigmoid_spike",
    "surrogate_primitive",
]
