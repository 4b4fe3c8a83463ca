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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from stars.runtime import compiled_or_eager

__all__ = ["FusedNeuronParams", "compiled_multi_step", "fused_multi_step"]


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


# --- the compiled kernels (``compile: true``) --------------------------------------------
#
# The same dynamics, written functionally over a whole sequence ``[T, M]`` so that inductor
# turns each direction into one loop over the elements that keeps the membrane in registers
# across the T steps (one read of the input and one write of the spikes; backward recomputes
# H the same way). Traced inside a model's own graph instead, the operator above is unrolled
# into inductor's fused BN-backward kernels, which then recompute the recurrence per
# reduction: slower than eager (benchmarks/README.md). The custom ops below keep it opaque
# to that graph. The float constants travel as a tensor, so that a threshold changed at run
# time does not recompile; the structure (IF or LIF, reset, surrogate) is compiled in.


@dataclass(frozen=True)
class _Structure:
    leaky: bool
    decay_input: bool
    hard_reset: bool
    detach_reset: bool
    atan: bool


def _structure_and_constants(p: FusedNeuronParams) -> tuple[_Structure, list[float]]:
    structure = _Structure(
        leaky=p.tau is not None,
        decay_input=p.decay_input and p.tau is not None,
        hard_reset=p.v_reset is not None,
        detach_reset=p.detach_reset,
        atan=p.surrogate == "atan",
    )
    k = 0.0 if p.tau is None else 1.0 / p.tau
    vr = 0.0 if p.v_reset is None else p.v_reset
    return structure, [k, 1.0 - k, p.v_threshold, vr, p.alpha]


def _potentials(x2d: Tensor, c: Tensor, s: _Structure) -> list[Tensor]:
    """H[t] for every step of ``x2d [T, M]`` (constants ``c``: 1/tau, 1 - 1/tau, V_th, V_r,
    alpha), in the membrane's dtype."""
    k, leak, v_th, v_r = c[0], c[1], c[2], c[3]
    v = torch.zeros_like(x2d[0], dtype=_compute_dtype(x2d.dtype)) + v_r
    hs = []
    for t in range(x2d.shape[0]):
        x = x2d[t].to(v.dtype)
        if s.leaky:
            h = v * leak + (x * k if s.decay_input else x) + v_r * k
        else:
            h = v + x
        hs.append(h)
        fired = h >= v_th
        v = torch.where(fired, v_r, h) if s.hard_reset else h - fired.to(h.dtype) * v_th
    return hs


def _sequence_spikes(x2d: Tensor, c: Tensor, s: _Structure) -> Tensor:
    return torch.stack([(h >= c[2]).to(x2d.dtype) for h in _potentials(x2d, c, s)])


def _sequence_input_grad(x2d: Tensor, g2d: Tensor, c: Tensor, s: _Structure) -> Tensor:
    hs = _potentials(x2d, c, s)
    k, leak, v_th, v_r, alpha = c[0], c[1], c[2], c[3], c[4]
    out: list[Tensor] = []
    carry: Tensor | None = None
    for t in range(len(hs) - 1, -1, -1):
        h = hs[t]
        z = h - v_th
        if s.atan:
            sg = (alpha / 2) / (1.0 + (math.pi / 2 * alpha * z) ** 2)
        else:
            sig = torch.sigmoid(alpha * z)
            sg = sig * (1.0 - sig) * alpha
        dh = g2d[t].to(h.dtype) * sg
        if carry is not None:
            if s.hard_reset:
                dv_dh = (h < v_th).to(h.dtype)
                if not s.detach_reset:
                    dv_dh = dv_dh + (v_r - h) * sg
                dh = dh + carry * dv_dh
            else:
                dh = dh + (carry if s.detach_reset else carry * (1.0 - v_th * sg))
        carry = dh * leak if s.leaky else dh
        out.append((dh * k if s.leaky and s.decay_input else dh).to(x2d.dtype))
    return torch.stack(out[::-1])


@functools.cache
def _kernels() -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """The two sequence functions under ``torch.compile`` (compiled on first use: one kernel
    per input dtype and structure, for any size and constants)."""
    fwd: Callable[..., Tensor] = torch.compile(_sequence_spikes, dynamic=True)
    bwd: Callable[..., Tensor] = torch.compile(_sequence_input_grad, dynamic=True)
    return fwd, bwd


def _run(which: int, *args: Any) -> Tensor:
    """Kernel ``which`` (0: spikes, 1: input gradient); if compiling or running it fails,
    warn and compute the same function eagerly (one compiled variant per dtype, structure,
    T and broadcast input)."""
    eager = (_sequence_spikes, _sequence_input_grad)[which]
    return compiled_or_eager(lambda: _kernels()[which], eager, *args, what="the neuron kernel")


_FLAGS = ("leaky", "decay_input", "hard_reset", "detach_reset", "atan")


def _unpack(flags: list[bool]) -> _Structure:
    return _Structure(**dict(zip(_FLAGS, flags, strict=True)))


@torch.library.custom_op("stars::compiled_spikes", mutates_args=())
def _spikes_op(x_seq: Tensor, constants: Tensor, flags: list[bool]) -> Tensor:
    x2d = x_seq.reshape(x_seq.shape[0], -1)
    return _run(0, x2d, constants, _unpack(flags)).view(x_seq.shape)


@_spikes_op.register_fake
def _(x_seq: Tensor, constants: Tensor, flags: list[bool]) -> Tensor:
    return torch.empty(x_seq.shape, dtype=x_seq.dtype, device=x_seq.device)


@torch.library.custom_op("stars::compiled_spikes_backward", mutates_args=())
def _spikes_backward_op(
    x_seq: Tensor, grad_spikes: Tensor, constants: Tensor, flags: list[bool]
) -> Tensor:
    steps = x_seq.shape[0]
    x2d = x_seq.reshape(steps, -1)
    g2d = grad_spikes.reshape(steps, -1)
    return _run(1, x2d, g2d, constants, _unpack(flags)).view(x_seq.shape)


@_spikes_backward_op.register_fake
def _(x_seq: Tensor, grad_spikes: Tensor, constants: Tensor, flags: list[bool]) -> Tensor:
    return torch.empty(x_seq.shape, dtype=x_seq.dtype, device=x_seq.device)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x_seq, constants, flags = inputs
    ctx.save_for_backward(x_seq, constants)
    ctx.flags = flags


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
    x_seq, constants = ctx.saved_tensors
    return _spikes_backward_op(x_seq, grad, constants, ctx.flags), None, None


_spikes_op.register_autograd(_backward, setup_context=_setup)


def compiled_multi_step(x_seq: Tensor, params: FusedNeuronParams) -> Tensor:
    """:func:`fused_multi_step` with both directions compiled by ``torch.compile`` (the
    ``compile: true`` path on CPU): the same spikes and surrogate gradients up to the order
    of float rounding (inductor may contract or reorder the charge's sums; the error model of
    ``tests/neurons/parity.py`` holds for any order). Backward keeps only the input. The
    first call per input dtype and neuron structure compiles (seconds)."""
    structure, constants = _structure_and_constants(params)
    c = torch.tensor(constants, dtype=_compute_dtype(x_seq.dtype), device=x_seq.device)
    flags = [getattr(structure, name) for name in _FLAGS]
    spikes: Tensor = _spikes_op(x_seq, c, flags)
    return spikes
