"""A small pure-PyTorch reference LIF / IF neuron, to cross-check spikingjelly.

Dynamics (spikingjelly's conventions; ``V_r`` is ``v_reset``, or 0 for soft reset):

- charge, LIF with ``decay_input``: ``H[t] = V[t-1] + (X[t] - (V[t-1] - V_r)) / tau``
- charge, LIF without it:           ``H[t] = V[t-1] - (V[t-1] - V_r) / tau + X[t]``
- charge, IF:                       ``H[t] = V[t-1] + X[t]``
- fire:  ``S[t] = Heaviside(H[t] - v_threshold)`` (``>= 0`` fires) with a surrogate gradient
- reset: hard ``V[t] = S[t] * V_r + (1 - S[t]) * H[t]``; soft ``V[t] = H[t] - S[t] * v_threshold``;
  with ``detach_reset`` the ``S[t]`` of the reset carries no gradient.
- ``V[-1] = V_r`` (hard) or 0 (soft).

Surrogates (forward Heaviside, backward the derivative of a smooth primitive):

- ATan (Fang et al., ICCV 2021): ``g(x) = atan(pi/2 * alpha * x) / pi + 1/2``,
  ``g'(x) = alpha / 2 / (1 + (pi/2 * alpha * x)^2)``.
- Sigmoid (Wu et al., STBP 2018): ``g(x) = sigmoid(alpha * x)``,
  ``g'(x) = alpha * sigmoid(alpha * x) * (1 - sigmoid(alpha * x))``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, assert_never

import torch
from torch import Tensor, nn

from stars.config import NeuronConfig

__all__ = [
    "ReferenceNeuron",
    "atan_spike",
    "reference_multi_step",
    "sigmoid_spike",
    "surrogate_primitive",
]


class _HeavisideSpike(torch.autograd.Function):
    """Heaviside forward; subclasses give the surrogate gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)


class _ATanSpike(_HeavisideSpike):
    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        alpha: float = ctx.alpha
        z = (math.pi / 2 * alpha) * x
        return grad_output * (alpha / 2) / (1 + z * z), None


class _SigmoidSpike(_HeavisideSpike):
    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        alpha: float = ctx.alpha
        s = torch.sigmoid(alpha * x)
        return grad_output * alpha * s * (1 - s), None


def atan_spike(x: Tensor, alpha: float = 2.0) -> Tensor:
    """Heaviside ``(x >= 0)`` with the ATan surrogate gradient; ``x`` of any shape."""
    out: Tensor = _ATanSpike.apply(x, alpha)
    return out


def sigmoid_spike(x: Tensor, alpha: float = 4.0) -> Tensor:
    """Heaviside ``(x >= 0)`` with the Sigmoid surrogate gradient; ``x`` of any shape."""
    out: Tensor = _SigmoidSpike.apply(x, alpha)
    return out


def surrogate_primitive(x: Tensor, surrogate: Literal["atan", "sigmoid"], alpha: float) -> Tensor:
    """The smooth function whose derivative is the surrogate gradient (for tests).

    Args:
        x: any shape.
        surrogate: ``"atan"`` or ``"sigmoid"``.
        alpha: sharpness.

    Returns:
        ``g(x)``, same shape as ``x``.
    """
    match surrogate:
        case "atan":
            return torch.atan((math.pi / 2 * alpha) * x) / math.pi + 0.5
        case "sigmoid":
            return torch.sigmoid(alpha * x)
        case _:
            assert_never(surrogate)


def reference_multi_step(
    x_seq: Tensor,
    *,
    kind: Literal["lif", "if"] = "lif",
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: Literal["atan", "sigmoid"] = "atan",
    alpha: float = 2.0,
) -> Tensor:
    """Run a LIF / IF neuron over ``x_seq`` from a fresh state (see the module docstring).

    Args:
        x_seq: input currents ``[T, N, *]``.
        kind: ``"lif"`` or ``"if"`` (``tau`` and ``decay_input`` are ignored by IF).
        tau: membrane time constant (> 1).
        v_threshold: firing threshold.
        v_reset: hard-reset potential, or ``None`` for soft reset.
        decay_input: whether the input is scaled by ``1 / tau`` too.
        detach_reset: cut the gradient through the reset.
        surrogate: ``"atan"`` or ``"sigmoid"``.
        alpha: surrogate sharpness.

    Returns:
        spikes ``[T, N, *]`` of 0.0 / 1.0.

    Raises:
        ValueError: an unknown ``kind`` or ``surrogate`` (never silently LIF or Sigmoid).
    """
    if kind not in ("lif", "if"):
        raise ValueError(f"kind must be 'lif' or 'if', got {kind!r}")
    if surrogate not in ("atan", "sigmoid"):
        raise ValueError(f"surrogate must be 'atan' or 'sigmoid', got {surrogate!r}")
    spike_fn = atan_spike if surrogate == "atan" else sigmoid_spike
    v_rest = 0.0 if v_reset is None else v_reset
    v = torch.full_like(x_seq[0], v_rest)
    spikes = []
    for x in x_seq:
        if kind == "if":
            h = v + x
        elif decay_input:
            h = v + (x - (v - v_rest)) / tau
        else:
            h = v - (v - v_rest) / tau + x
        s = spike_fn(h - v_threshold, alpha)
        s_reset = s.detach() if detach_reset else s
        v = (
            h - s_reset * v_threshold
            if v_reset is None
            else s_reset * v_reset + (1.0 - s_reset) * h
        )
        spikes.append(s)
    return torch.stack(spikes)


class ReferenceNeuron(nn.Module):
    """Module form of :func:`reference_multi_step` (no parameters, no state).

    Args:
        kind: ``"lif"`` or ``"if"``.
        tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha: as in
            :func:`reference_multi_step`.
    """

    def __init__(
        self,
        kind: Literal["lif", "if"] = "lif",
        *,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        decay_input: bool = True,
        detach_reset: bool = False,
        surrogate: Literal["atan", "sigmoid"] = "atan",
        alpha: float = 2.0,
    ) -> None:
        super().__init__()
        self.kind: Literal["lif", "if"] = kind
        self.tau = tau
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.decay_input = decay_input
        self.detach_reset = detach_reset
        self.surrogate: Literal["atan", "sigmoid"] = surrogate
        self.alpha = alpha

    @classmethod
    def from_config(cls, cfg: NeuronConfig) -> ReferenceNeuron:
        """The reference twin of ``build_neuron(cfg)``; ``plif`` maps to LIF at its initial tau."""
        kind: Literal["lif", "if"]
        match cfg.kind:
            case "lif" | "plif":
                kind = "lif"
            case "if":
                kind = "if"
            case _:
                assert_never(cfg.kind)
        return cls(
            kind,
            tau=cfg.tau,
            v_threshold=cfg.v_threshold,
            v_reset=cfg.v_reset,
            decay_input=cfg.decay_input,
            detach_reset=cfg.detach_reset,
            surrogate=cfg.surrogate,
            alpha=cfg.surrogate_alpha,
        )

    def forward(self, x_seq: Tensor) -> Tensor:
        """Spikes ``[T, N, *]`` for input currents ``x_seq [T, N, *]``."""
        return reference_multi_step(
            x_seq,
            kind=self.kind,
            tau=self.tau,
            v_threshold=self.v_threshold,
            v_reset=self.v_reset,
            decay_input=self.decay_input,
            detach_reset=self.detach_reset,
            surrogate=self.surrogate,
            alpha=self.alpha,
        )
