"""A memory-lean multi-step LIF / IF operator for CPU (the ``auto`` backend on CPU).

spikingjelly 2.0 has fused CUDA / Triton kernels, but on CPU its multi-step operator is a
Python loop that collects per-step lists and stacks them, and keeps the charged potential
``H`` for backward: about six input-sized float tensors are live at its peak. On a
spiking student at T = 4 that made a training step take 7x the memory of the same network
with ReLU (``benchmarks/perf.py``). This operator computes the same function (same spikes,
same surrogate gradients: see ``tests/neurons``) with:

- outputs written in place into preallocated tensors (no lists, no stacking);
- only the *input* saved for backward; ``H`` is recomputed in backward into the buffer
  that then receives the input gradient, step by step, in place. When the input is a view
  broadcast over time (the direct encoder repeats one current T times), saving it costs
  1/T of a tensor.

Dynamics are those of :mod:`stars.neurons.reference` (spikingjelly's conventions):

- charge: LIF ``H = V + (X - (V - V_r)) / tau`` (``decay_input``), or
  ``H = V - (V - V_r) / tau + X``; IF ``H = V + X``
- fire: ``S = H >= v_threshold``, surrogate gradient ``g'(H - v_threshold)``
- reset: hard ``V = S * V_r + (1 - S) * H``, soft ``V = H - S * v_threshold``; the reset's
  ``S`` carries gradient unless ``detach_reset``.

Backward through time (``c`` is the gradient reaching ``V[t]`` from step ``t + 1``)::

    dH[t] = dS[t] * g' + c * dV/dH[t]
    dV/dH = 1 - S (+ (V_r - H) * g' unless detached)   hard reset
    dV/dH = 1     (-  v_threshold * g' unless detached)  soft reset
    dX[t] = dH[t] / tau (LIF with decay_input) else dH[t]
    c     = dH[t] * (1 - 1 / tau) (LIF) or dH[t] (IF)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["FusedNeuronParams", "fused_multi_step"]


@dataclass(frozen=True)
class FusedNeuronParams:
    """Constants of one neuron layer. ``tau=None`` means IF (no leak)."""

    tau: float | None
    decay_input: bool
    v_threshold: float
    v_reset: float | None
    detach_reset: bool
    surrogate: Literal["atan", "sigmoid"]
    alpha: float


def _charge(p: FusedNeuronParams, v: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """``H`` from the previous potential ``v`` and the input ``x`` (float), into ``out``."""
    if p.tau is None:
        return torch.add(v, x, out=out)
    vr = 0.0 if p.v_reset is None else p.v_reset
    k = 1.0 / p.tau
    torch.mul(v, 1.0 - k, out=out).add_(x, alpha=k if p.decay_input else 1.0)
    if vr:  # the leak pulls towards V_r in both forms
        out.add_(vr * k)
    return out


def _reset(p: FusedNeuronParams, h: Tensor, fired: Tensor) -> Tensor:
    """The potential after firing (a new tensor; ``h`` is left as it is)."""
    if p.v_reset is None:
        return h - fired.to(h.dtype) * p.v_threshold
    return h.masked_fill(fired, p.v_reset)


def _surrogate_grad(p: FusedNeuronParams, h: Tensor) -> Tensor:
    x = h - p.v_threshold
    if p.surrogate == "atan":
        z = x.mul_(math.pi / 2 * p.alpha).square_()
        return z.add_(1.0).reciprocal_().mul_(p.alpha / 2)
    s = x.mul_(p.alpha).sigmoid_()
    return s.mul_(1.0 - s).mul_(p.alpha)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _FusedMultiStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_seq: Tensor, p: FusedNeuronParams) -> Tensor:
        cdt = _compute_dtype(x_seq.dtype)
        spikes = torch.empty(x_seq.shape, dtype=x_seq.dtype, device=x_seq.device)
        v = torch.full(
            x_seq.shape[1:],
            0.0 if p.v_reset is None else p.v_reset,
            dtype=cdt,
            device=x_seq.device,
        )
        h = torch.empty_like(v)
        for t in range(x_seq.shape[0]):
            _charge(p, v, x_seq[t].to(cdt), h)
            fired = h >= p.v_threshold
            spikes[t].copy_(fired)
            v = _reset(p, h, fired)
        ctx.save_for_backward(x_seq)
        ctx.p = p
        return spikes

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_spikes: Tensor) -> tuple[Tensor, None]:
        (x_seq,) = ctx.saved_tensors
        p: FusedNeuronParams = ctx.p
        cdt = _compute_dtype(x_seq.dtype)
        steps = x_seq.shape[0]
        # 1. recompute H for every step into the buffer that will hold the input gradient
        buf = torch.empty(x_seq.shape, dtype=cdt, device=x_seq.device)
        v = torch.full(
            x_seq.shape[1:],
            0.0 if p.v_reset is None else p.v_reset,
            dtype=cdt,
            device=x_seq.device,
        )
        for t in range(steps):
            _charge(p, v, x_seq[t].to(cdt), buf[t])
            v = _reset(p, buf[t], buf[t] >= p.v_threshold)
        # 2. backward through time, overwriting H[t] with dX[t] once it has been used
        carry: Tensor | None = None
        leak = 1.0 if p.tau is None else 1.0 - 1.0 / p.tau
        for t in range(steps - 1, -1, -1):
            h = buf[t]
            sg = _surrogate_grad(p, h.clone())
            dh = grad_spikes[t].to(cdt) * sg
            if carry is not None:
                fired = h >= p.v_threshold
                if p.v_reset is None:
                    dv_dh = torch.ones_like(h) if p.detach_reset else 1.0 - p.v_threshold * sg
                else:
                    dv_dh = (~fired).to(cdt)
                    if not p.detach_reset:
                        dv_dh = dv_dh + (p.v_reset - h) * sg
                dh.addcmul_(carry, dv_dh)
            carry = dh * leak if p.tau is not None else dh
            if p.tau is not None and p.decay_input:
                h.copy_(dh).mul_(1.0 / p.tau)
            else:
                h.copy_(dh)
        return buf.to(x_seq.dtype), None


def fused_multi_step(x_seq: Tensor, params: FusedNeuronParams) -> Tensor:
    """Spikes ``[T, N, *]`` (0.0 / 1.0 in the dtype of ``x_seq``) from a fresh state.

    The membrane is float32 for half-precision and float32 inputs, float64 for float64.
    Differentiable once (the surrogate gradient); no graph is kept beyond the input.
    """
    spikes: Tensor = _FusedMultiStep.apply(x_seq, params)
    return spikes
