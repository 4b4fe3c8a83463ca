"""Spike-aware Tail-Aware Regularization: the student's threshold crossings against the
teacher's tail exceedances on the same batch (STARS, arXiv 2605.27409; this reading is ours,
docs/design.md section 4.6).

Pure functions, tensors in, tensors out. For each pair ``(s, l)`` of a student spiking layer
``s`` and a teacher BatchNorm layer ``l`` (:func:`pair_layers`):

- student: the charged potential ``H [T, N, C_s, *]`` (:mod:`stars.neurons.membrane`) gives
  the soft firing probability ``q = sigmoid((H - V_th) / tau_s)``; averaged over time and
  channels it is the firing map ``a_s [N, *]`` (:func:`student_firing_map`);
- teacher: the input ``h [N, C_t, *]`` of BN layer ``l`` gives the soft exceedance
  ``e = sigmoid((h - theta_c) / tau_c)`` over a per-channel threshold (``mu + kappa * std``
  from the BN prior, or the batch's own per-channel quantile,
  :func:`batch_quantile_thresholds`); averaged over channels it is ``a_t [N, *]``
  (:func:`teacher_exceedance_map`). Constant targets (a Gaussian or Laplace tail mass) are
  also possible.
- the two maps are brought to a common resolution (average pooling), reduced to the chosen
  granularity (``spatial``: ``[N, h, w]``; ``sample``: ``[N]``; ``batch``: a scalar), and
  compared (:func:`spike_tail_loss`):

  ``L = mean_u (a_s,u - a_t,u)^2 / v``, ``v = max(pbar (1 - pbar), 1e-3)``,
  ``pbar = mean_u a_t,u`` (detached): a Bernoulli-variance scaling as in TAR;
  with ``normalize`` each side is first divided by its own mean over the units (so only the
  *pattern* of crossings must agree, not the firing level) and ``v = 1``.

Channel counts differ between teacher and student, so nothing is compared channel by
channel; the channel mean is what both sides share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stars.config import SpikeTARConfig
from stars.neurons.membrane import MembraneTap
from stars.neurons.spikingjelly_neurons import MultiStepNeuron
from stars.synthesis.priors import BNPrior, gaussian_tail, laplace_tail

__all__ = [
    "Granularity",
    "SpikeTailTerm",
    "batch_quantile_thresholds",
    "pair_layers",
    "reduce_maps",
    "spike_tail_loss",
    "student_firing_map",
    "teacher_exceedance_map",
]

Granularity = Literal["batch", "sample", "spatial"]

VARIANCE_FLOOR = 1e-3
"""Lower bound of the Bernoulli variance ``pbar (1 - pbar)`` that scales the loss."""
NORMALIZE_EPS = 1e-6
"""Added to a map's mean before dividing by it (``normalize``): a silent map stays finite."""


def _index(i: int, n: int, what: str) -> int:
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise ValueError(f"{what} index {i} is out of range for {n} layers")
    return j


def pair_layers(
    num_student: int,
    num_teacher: int,
    *,
    stages: Sequence[int] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Which teacher BN layer each chosen student spiking layer is compared with.

    ``pairs`` (explicit ``(student, teacher)`` indices, negative counting from the end) wins.
    Otherwise each student layer ``s`` in ``stages`` (default: all) is paired by relative
    depth: ``l = ceil((s + 1) * L / S) - 1`` for ``S`` student and ``L`` teacher layers, so
    the first student layer meets an early teacher layer and the last meets the last.

    Returns:
        ``[(s, l), ...]`` with non-negative indices, in the order given (stages sorted).

    Raises:
        ValueError: an index out of range, a repeated student layer, or no layers.
    """
    if num_student < 1 or num_teacher < 1:
        raise ValueError(f"pair_layers: need layers on both sides ({num_student}, {num_teacher})")
    if pairs is not None:
        out = [
            (_index(s, num_student, "student"), _index(t, num_teacher, "teacher")) for s, t in pairs
        ]
    else:
        chosen = (
            range(num_student)
            if stages is None
            else sorted({_index(s, num_student, "student") for s in stages})
        )
        out = [(s, -(-(s + 1) * num_teacher // num_student) - 1) for s in chosen]
    if not out:
        raise ValueError("pair_layers: no layer chosen")
    if len({s for s, _ in out}) != len(out):
        raise ValueError(f"pair_layers: a student layer appears twice in {out}")
    return out


def student_firing_map(h_seq: Tensor, *, v_threshold: float, tau: float) -> Tensor:
    """``a_s = mean_{t, c} sigmoid((H - V_th) / tau)``: ``[T, N, C, *] -> [N, *]`` (float32;
    float64 for float64 input, as :func:`~stars.neurons.membrane.soft_firing_map`)."""
    if h_seq.ndim < 3:
        raise ValueError(f"student_firing_map: expected H [T, N, C, *], got {tuple(h_seq.shape)}")
    if not tau > 0:
        raise ValueError(f"student_firing_map: tau must be > 0, got {tau}")
    h = h_seq if h_seq.dtype == torch.float64 else h_seq.float()
    q = torch.sigmoid((h - v_threshold) / tau)
    return q.mean(dim=(0, 2))


def teacher_exceedance_map(h: Tensor, theta: Tensor, tau: Tensor) -> Tensor:
    """``a_t = mean_c sigmoid((h - theta_c) / tau_c)``: ``[N, C, *] -> [N, *]`` (float32).

    Args:
        h: the teacher's activations ``[N, C, *]``.
        theta: per-channel thresholds ``[C]``.
        tau: per-channel temperatures ``[C]``, ``> 0``.
    """
    if h.ndim < 2 or theta.shape != (h.shape[1],) or tau.shape != (h.shape[1],):
        raise ValueError(
            "teacher_exceedance_map: expected h [N, C, *], theta [C], tau [C]; got "
            f"{tuple(h.shape)}, {tuple(theta.shape)}, {tuple(tau.shape)}"
        )
    x = h.float()
    view = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    th = theta.to(device=x.device, dtype=x.dtype).view(view)
    ta = tau.to(device=x.device, dtype=x.dtype).view(view)
    return torch.sigmoid((x - th) / ta).mean(dim=1)


def batch_quantile_thresholds(h: Tensor, tail_mass: float) -> Tensor:
    """Per-channel thresholds from the batch at hand: the ``1 - tail_mass`` quantile of each
    channel of ``h [N, C, *]`` over N and space (detached, ``[C]``)."""
    if not 0.0 < tail_mass < 1.0:
        raise ValueError(f"batch_quantile_thresholds: tail_mass must be in (0, 1), got {tail_mass}")
    flat = h.detach().float().transpose(0, 1).reshape(h.shape[1], -1)
    m = flat.shape[1]
    # the k-th smallest value with k = ceil((1 - q) m): at most a fraction q lies above it
    k = min(m, max(1, math.ceil((1.0 - tail_mass) * m - 1e-9)))
    return flat.kthvalue(k, dim=1).values


def _per_sample(a: Tensor) -> Tensor:
    return a.flatten(1).mean(1) if a.ndim > 1 else a


def _common(a: Tensor, b: Tensor, caller: str) -> tuple[Tensor, Tensor]:
    """Bring two maps ``[N, *]`` to the same shape: average-pool the finer spatial grid to the
    coarser one; a map without spatial dims makes the other one averaged over space. Errors
    start with ``caller``."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{caller}: batch sizes differ ({a.shape[0]} vs {b.shape[0]})")
    if a.ndim == 1 or b.ndim == 1:
        return _per_sample(a), _per_sample(b)
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"{caller}: maps must be [N] or [N, H, W]; got {a.shape}, {b.shape}")
    size = (min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2]))
    if tuple(a.shape[1:]) != size:
        a = F.adaptive_avg_pool2d(a[:, None], size)[:, 0]
    if tuple(b.shape[1:]) != size:
        b = F.adaptive_avg_pool2d(b[:, None], size)[:, 0]
    return a, b


def reduce_maps(
    a_s: Tensor, a_t: Tensor, granularity: Granularity, *, caller: str = "reduce_maps"
) -> tuple[Tensor, Tensor]:
    """Student and teacher maps ``[N, *]`` at a common resolution, reduced to ``granularity``
    (``spatial`` keeps ``[N, h, w]``, ``sample`` gives ``[N]``, ``batch`` a 1-element ``[1]``).

    Raises:
        ValueError: different batch sizes, or a map that is neither ``[N]`` nor
            ``[N, H, W]``; the message starts with ``caller``.
    """
    a_s, a_t = _common(a_s, a_t, caller)
    if granularity == "spatial":
        return a_s, a_t
    if granularity == "sample":
        return _per_sample(a_s), _per_sample(a_t)
    return a_s.mean().reshape(1), a_t.mean().reshape(1)


def spike_tail_loss(
    a_s: Tensor,
    a_t: Tensor,
    *,
    granularity: Granularity = "spatial",
    normalize: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """Spike-aware TAR between a student firing map and a teacher exceedance map.

    ``L = mean_u (a_s,u - a_t,u)^2 / v`` over the units ``u`` of the granularity, with
    ``v = max(pbar (1 - pbar), 1e-3)`` and ``pbar`` the (detached) mean of ``a_t``; with
    ``normalize`` both sides are divided by their own mean first (``+1e-6``) and ``v = 1``.

    Args:
        a_s: student map ``[N, *]`` in ``[0, 1]`` (:func:`student_firing_map`).
        a_t: target map ``[N, *]`` in ``[0, 1]`` (:func:`teacher_exceedance_map`, or a
            constant tail mass broadcast to a shape).
        granularity: ``spatial`` / ``sample`` / ``batch`` (see :func:`reduce_maps`).
        normalize: compare the patterns only (not meaningful with ``batch``: refused).
        weights: optional ``[N]`` 0/1 gate (e.g. the samples the student already classifies
            like the teacher); the loss is the mean of the per-sample losses over the gated
            samples, 0 when none is. Not with ``batch``.

    Returns:
        Scalar float32 ``>= 0``; without ``normalize``, ``<= 1 / v <= 1000``; 0 when the two
        maps are equal (with ``normalize``: proportional); invariant to a shared permutation
        of the batch.
    """
    if granularity == "batch" and (normalize or weights is not None):
        raise ValueError("spike_tail_loss: granularity 'batch' takes neither normalize nor weights")
    s, t = reduce_maps(a_s.float(), a_t.float(), granularity, caller="spike_tail_loss")
    if normalize:
        s = s / (s.mean() + NORMALIZE_EPS)
        t = t / (t.mean() + NORMALIZE_EPS)
        var = torch.ones((), device=s.device)
    else:
        pbar = t.detach().mean()
        var = (pbar * (1.0 - pbar)).clamp_min(VARIANCE_FLOOR)
    sq = (s - t).pow(2) / var
    if weights is None:
        return sq.mean()
    if weights.shape != (sq.shape[0],):
        raise ValueError(f"spike_tail_loss: weights must be [N], got {tuple(weights.shape)}")
    w = weights.to(sq.dtype)
    per_sample = sq.flatten(1).mean(1) if sq.ndim > 1 else sq
    return (w * per_sample).sum() / w.sum().clamp_min(1.0)


class SpikeTailTerm:
    """Spike-aware TAR around a teacher's BN prior: pairs layers, holds the teacher-side
    thresholds, and computes ``sum over pairs of spike_tail_loss`` from one teacher and one
    student forward pass (the student's potentials through a
    :class:`~stars.neurons.membrane.MembraneTap`). Used by the generator objective and by the
    distiller.

    Args:
        cfg: the ``stars.spike_tar`` block.
        bn_prior: the teacher's BN prior (thresholds ``mu + kappa * std``, temperatures
            ``teacher_tau_rel * std``).
    """

    def __init__(self, cfg: SpikeTARConfig, bn_prior: BNPrior) -> None:
        self.cfg = cfg
        self.num_teacher = len(bn_prior.layers)
        self.theta = [layer.running_mean + cfg.kappa * layer.std for layer in bn_prior.layers]
        self.tau = [cfg.teacher_tau_rel * layer.std for layer in bn_prior.layers]
        kappa = torch.tensor(cfg.kappa, dtype=torch.float64)
        self.constant: float | None = None
        if cfg.target == "gaussian":
            self.constant = float(gaussian_tail(kappa))
        elif cfg.target == "laplace":
            self.constant = float(laplace_tail(kappa))

    def pairs(self, num_student: int) -> list[tuple[int, int]]:
        """``(student layer, teacher BN layer)`` for a student with ``num_student`` spiking
        layers."""
        return pair_layers(
            num_student,
            self.num_teacher,
            stages=self.cfg.stages,
            pairs=[(int(a), int(b)) for a, b in self.cfg.pairs] if self.cfg.pairs else None,
        )

    def tapped(self, neurons: Sequence[nn.Module]) -> list[nn.Module]:
        """The student neurons to hook (those in :meth:`pairs`), in pair order."""
        return [neurons[s] for s, _ in self.pairs(len(neurons))]

    def maps(
        self,
        teacher_acts: Mapping[int, Tensor],
        tap: MembraneTap,
        neurons: Sequence[nn.Module],
    ) -> list[tuple[Tensor, Tensor]]:
        """``(a_s [N, *], a_t [N, *])`` per pair.

        Args:
            teacher_acts: teacher BN layer index -> that layer's input ``[N, C, *]`` (at least
                the paired layers; e.g. ``dict(enumerate(all_inputs))``).
            tap: a membrane tap that saw the student's forward pass.
            neurons: the student's spiking layers, forward order.
        """
        out: list[tuple[Tensor, Tensor]] = []
        for s, t in self.pairs(len(neurons)):
            neuron = neurons[s]
            assert isinstance(neuron, MultiStepNeuron)
            vth = neuron.v_threshold
            # the fused one-pass map: the value of student_firing_map(tap[neuron], ...) with
            # x_seq and the spikes kept for backward instead of the potentials' graph
            a_s = tap.firing_map(neuron, self.cfg.tau_rel * vth)
            h = teacher_acts[t]
            if self.constant is not None:
                a_t = torch.full((h.shape[0], *h.shape[2:]), self.constant, device=h.device)
            else:
                theta = (
                    batch_quantile_thresholds(h, self.cfg.tail_mass)
                    if self.cfg.threshold == "batch-quantile"
                    else self.theta[t]
                )
                a_t = teacher_exceedance_map(h, theta, self.tau[t])
            out.append((a_s, a_t))
        return out

    def loss(
        self,
        teacher_acts: Mapping[int, Tensor],
        tap: MembraneTap,
        neurons: Sequence[nn.Module],
        *,
        gate: Tensor | None = None,
    ) -> Tensor:
        """``sum over pairs of spike_tail_loss(a_s, a_t)`` (the teacher side detached)."""
        terms = [
            spike_tail_loss(
                a_s,
                a_t.detach(),
                granularity=self.cfg.granularity,
                normalize=self.cfg.normalize,
                weights=gate,
            )
            for a_s, a_t in self.maps(teacher_acts, tap, neurons)
        ]
        return torch.stack(terms).sum()

    def to(self, device: torch.device) -> SpikeTailTerm:
        self.theta = [t.to(device) for t in self.theta]
        self.tau = [t.to(device) for t in self.tau]
        return self
