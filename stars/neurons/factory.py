"""``build_neuron``: a :class:`~stars.config.NeuronConfig` -> a multi-step spiking neuron."""

from __future__ import annotations

from typing import assert_never

from spikingjelly.activation_based import neuron as sj_neuron
from torch import nn

from stars.config import NeuronConfig
from stars.neurons.spikingjelly_neurons import MultiStepNeuron, build_surrogate

__all__ = ["build_neuron"]


def build_neuron(cfg: NeuronConfig) -> MultiStepNeuron:
    """Build the spiking neuron layer a config describes (docs/design.md section 5).

    Every field is used: ``kind`` picks spikingjelly's ``LIFNode`` / ``IFNode`` /
    ``ParametricLIFNode`` (``tau`` is its initial value for ``plif``, unused by ``if``);
    ``v_threshold``, ``v_reset`` (``None`` = soft reset), ``decay_input`` (unused by ``if``),
    ``detach_reset``, ``surrogate`` + ``surrogate_alpha`` and ``backend`` (see
    :mod:`stars.neurons.spikingjelly_neurons`) go to the node / wrapper.

    Args:
        cfg: the neuron configuration.

    Returns:
        A fresh :class:`MultiStepNeuron`: ``[T, N, *]`` currents -> ``[T, N, *]`` spikes.
    """
    surrogate = build_surrogate(
        cfg.surrogate, cfg.surrogate_alpha, torch_path=cfg.backend == "torch"
    )
    v_threshold = float(cfg.v_threshold)
    v_reset = None if cfg.v_reset is None else float(cfg.v_reset)
    node: nn.Module
    match cfg.kind:
        case "lif":
            node = sj_neuron.LIFNode(
                tau=float(cfg.tau),
                decay_input=cfg.decay_input,
                v_threshold=v_threshold,
                v_reset=v_reset,
                surrogate_function=surrogate,
                detach_reset=cfg.detach_reset,
                step_mode="m",
            )
        case "if":
            node = sj_neuron.IFNode(
                v_threshold=v_threshold,
                v_reset=v_reset,
                surrogate_function=surrogate,
                detach_reset=cfg.detach_reset,
                step_mode="m",
            )
        case "plif":
            node = sj_neuron.ParametricLIFNode(
                init_tau=float(cfg.tau),
                decay_input=cfg.decay_input,
                v_threshold=v_threshold,
                v_reset=v_reset,
                surrogate_function=surrogate,
                detach_reset=cfg.detach_reset,
                step_mode="m",
            )
        case _:
            assert_never(cfg.kind)
    return MultiStepNeuron(node, kind=cfg.kind, backend=cfg.backend)
