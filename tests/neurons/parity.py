"""A float64 trajectory of a neuron and the error model that parity tests compare against.

Every implementation (stars' fused CPU operator, spikingjelly's PyTorch path, the reference
neuron) computes the same function; they differ only by rounding. The model, per element:

- **Charge.** One step rounds the charge and the reset a few times (a product, two sums, the
  reset), each by ``u`` of its operands: ``H[t]`` of an implementation working in precision
  ``u`` is within ``e[t] = sum_{s <= t} 6 u (|V[s-1]| + |X[s]| + |V_r| + V_th)`` of the exact
  one (the leak ``<= 1`` and a reset never grow an error; ``|V| <= |H| + V_th``). A spike can
  differ only where ``|H[t] - V_th|`` is within that (plus the float64 truth's own ``e``):
  such a step is *near*, and the two trajectories may part from there on. Spikes are compared
  exactly up to the first near step of each element.
- **Gradient.** On elements with no near step, every implementation back-propagates through
  the same spikes. The input gradient is a sum over paths of products of local factors (the
  surrogate ``g'``, the reset's ``dV/dH``, the leak, the input scale). Each factor ``f`` is off
  by at most ``rho_f``: a few ``u`` of rounding (for Sigmoid's ``alpha s (1 - s)`` also
  ``2 alpha u`` absolute, as ``1 - s`` cancels), and for ``g'`` its change over the charge's
  error, ``|g''| e <= k |g'| e`` with ``k = pi alpha / 2`` (ATan) or ``alpha`` (Sigmoid). A
  product of perturbed factors moves by at most ``prod (|f| + rho_f) - prod |f|``, so the
  gradient moves by at most ``A(rho) - A(0)``, ``A`` being the backward recursion run on the
  factors' magnitudes (:func:`gradient_tolerance`). That holds for any order of the sums, and
  so for every implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stars.neurons.membrane import MembraneParams
from stars.neurons.reference import ReferenceNeuron


@dataclass(frozen=True)
class Neuron:
    """The constants of one neuron (``tau=None``: IF)."""

    tau: float | None
    decay_input: bool
    v_threshold: float
    v_reset: float | None
    detach_reset: bool
    surrogate: str
    alpha: float

    @property
    def membrane(self) -> MembraneParams:
        return MembraneParams(self.tau, self.decay_input, self.v_threshold, self.v_reset)


@dataclass(frozen=True)
class Truth:
    """The float64 trajectory of a neuron: charged potentials and spikes ``[T, N, *]``."""

    h: Tensor
    s: Tensor


def trajectory(x_seq: Tensor, p: Neuron) -> Truth:
    """``H`` and ``S`` in float64 from the reference equations (its own spikes)."""
    x = x_seq.detach().double()
    vr = 0.0 if p.v_reset is None else p.v_reset
    v = torch.full_like(x[0], vr)
    hs, ss = [], []
    for xt in x:
        if p.tau is None:
            h = v + xt
        elif p.decay_input:
            h = v + (xt - (v - vr)) / p.tau
        else:
            h = v - (v - vr) / p.tau + xt
        s = (h >= p.v_threshold).double()
        v = h - s * p.v_threshold if p.v_reset is None else s * vr + (1 - s) * h
        hs.append(h)
        ss.append(s)
    return Truth(torch.stack(hs), torch.stack(ss))


def charge_error(x_seq: Tensor, truth: Truth, p: Neuron, u: float) -> Tensor:
    """``e[t]`` of the module docstring, ``[T, N, *]`` float64."""
    x = x_seq.detach().double().abs()
    vr = 0.0 if p.v_reset is None else abs(p.v_reset)
    v_prev = torch.cat([torch.full_like(truth.h[:1], vr), truth.h[:-1].abs() + p.v_threshold])
    return torch.cumsum(6 * u * (v_prev + x + vr + p.v_threshold), dim=0)


def clean_steps(x_seq: Tensor, truth: Truth, p: Neuron, u: float) -> Tensor:
    """``[T, N, *]`` bool: steps before the element's first near step (spikes must agree)."""
    tol = charge_error(x_seq, truth, p, u) + charge_error(x_seq, truth, p, 2.0**-53)
    near = (truth.h - p.v_threshold).abs() <= tol
    return near.cumsum(0) == 0


def _surrogate(p: Neuron, x: Tensor) -> tuple[Tensor, float]:
    """``g'(x)`` and the bound ``k`` on ``|g''| / |g'|``."""
    if p.surrogate == "atan":
        z = (math.pi / 2 * p.alpha) * x
        return (p.alpha / 2) / (1 + z * z), math.pi * p.alpha / 2
    sig = torch.sigmoid(p.alpha * x)
    return p.alpha * sig * (1 - sig), p.alpha


def gradient_tolerance(
    x_seq: Tensor, upstream: Tensor, truth: Truth, p: Neuron, u: float
) -> Tensor:
    """Bound ``[T, N, *]`` on the error of ``dL/dX`` of an implementation in precision ``u``,
    for ``L = sum(S * upstream)`` (module docstring), valid on elements with no near step;
    summed over T it bounds the gradient of an input broadcast over time. Add the float64
    reference's own bound (``u = 2^-53``) when comparing with it."""
    e = charge_error(x_seq, truth, p, u)
    g, k = _surrogate(p, truth.h - p.v_threshold)
    # g' at H - V_th, which is off by e plus the subtraction's u |H - V_th|; its own rounding
    # is 8 u relative, and for Sigmoid alpha s (1 - s) also 2 alpha u absolute (1 - s
    # cancels: s is off by 2 u s, absolutely)
    rho_g = g * (k * (e + u * (truth.h - p.v_threshold).abs()) + 8 * u)
    if p.surrogate == "sigmoid":
        rho_g = rho_g + 2 * p.alpha * u
    if p.v_reset is None:
        dv = torch.ones_like(g) if p.detach_reset else 1 - p.v_threshold * g
        rho_v = torch.zeros_like(g) if p.detach_reset else p.v_threshold * rho_g + 4 * u * dv.abs()
    else:
        dv = 1 - truth.s
        rho_v = torch.zeros_like(g)
        if not p.detach_reset:
            gap = p.v_reset - truth.h
            dv = dv + gap * g
            rho_v = e * g + gap.abs() * rho_g + 4 * u * dv.abs()
    leak = 1.0 if p.tau is None else 1 - 1 / p.tau
    kx = 1 / p.tau if p.tau is not None and p.decay_input else 1.0
    up = upstream.detach().double().abs()

    def magnitude(scale: float) -> Tensor:
        out = torch.empty_like(g)
        carry = torch.zeros_like(g[0])
        for t in range(g.shape[0] - 1, -1, -1):
            dh = up[t] * (g[t] + scale * rho_g[t]) + carry * (dv[t].abs() + scale * rho_v[t])
            carry = dh * (leak + scale * 2 * u)
            out[t] = dh * (kx + scale * 2 * u * kx)
        return out

    exact = magnitude(0.0)
    # (T + 2) u of the magnitude: the last product's rounding, and the sum over the T steps of
    # a gradient broadcast over time
    return magnitude(1.0) - exact + (g.shape[0] + 2) * u * exact


def reference_neuron(p: Neuron) -> ReferenceNeuron:
    """The reference equations' module for ``p`` (PLIF: its current tau, as a LIF)."""
    return ReferenceNeuron(
        "if" if p.tau is None else "lif",
        tau=p.tau if p.tau is not None else 2.0,
        v_threshold=p.v_threshold,
        v_reset=p.v_reset,
        decay_input=p.decay_input,
        detach_reset=p.detach_reset,
        surrogate="atan" if p.surrogate == "atan" else "sigmoid",
        alpha=p.alpha,
    )


@dataclass(frozen=True)
class Expectation:
    """What an implementation in precision ``u`` must reproduce on one input (see
    :func:`expectation`)."""

    truth: Truth
    clean: Tensor
    """``[T, N, *]``: steps whose spikes must equal the truth's."""
    whole: Tensor
    """Elements (shaped like the input's gradient) whose every step is clean."""
    exact: Tensor
    """The float64 reference's input gradient."""
    tol: Tensor
    """Bound on an implementation's gradient error there (plus the reference's own)."""


def expectation(base: Tensor, steps: int, upstream: Tensor, p: Neuron, u: float) -> Expectation:
    """The float64 truth for ``base`` (``[T, N, *]``, or ``[N, *]`` broadcast over ``steps``)
    under ``L = sum(S * upstream)``."""
    broadcast = base.ndim == upstream.ndim - 1
    x_seq = base.expand(steps, *base.shape) if broadcast else base
    truth = trajectory(x_seq, p)
    clean = clean_steps(x_seq, truth, p, u)
    tol = gradient_tolerance(x_seq, upstream, truth, p, u) + gradient_tolerance(
        x_seq, upstream, truth, p, 2.0**-53
    )
    whole = clean.all(0)
    if broadcast:
        tol = tol.sum(0)
    else:
        whole = whole.expand(x_seq.shape)
    reference = reference_neuron(p)
    x = base.detach().double().requires_grad_(True)
    spikes = reference(x.expand(steps, *x.shape) if broadcast else x)
    (exact,) = torch.autograd.grad((spikes * upstream.double()).sum(), x)
    return Expectation(truth, clean, whole, exact, tol)
