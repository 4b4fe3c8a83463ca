"""Synthesis objectives: pure functions, tensors in, scalar tensor out (docs/design.md section 4).

Every function here is stateless and differentiable; options are keyword-only. The terms of
the generator objective

    L_G = lambda_bn L_bn + lambda_oh L_oh + lambda_adv L_adv
          + lambda_rca (±L_rca) + lambda_tar L_tar

are :func:`bn_matching` (DeepInversion), :func:`class_cross_entropy`,
:func:`adversarial_masked_kl` (Fast / CMI), :func:`rca_loss` / :func:`rca_adversarial` and
:func:`tar_loss` (STARS), plus the baselines' own terms: :func:`dafl_activation`,
:func:`dafl_information_entropy` (DAFL), :func:`dfad_l1` (DFAD), :func:`total_variation` and
:func:`image_l2` (DeepInversion's image priors).

Losses are computed in float32 at least (half-precision inputs are upcast), so that they can
be called under autocast. Which side is detached (e.g. the teacher in RCA) is the caller's
choice: nothing here detaches its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from stars.synthesis.priors import BNPrior, TailPrior, batch_stats

__all__ = [
    "adversarial_masked_kl",
    "agreement_mask",
    "bn_matching",
    "class_cross_entropy",
    "dafl_activation",
    "dafl_information_entropy",
    "dfad_l1",
    "image_l2",
    "momentum_stats",
    "rca_adversarial",
    "rca_loss",
    "relation_matrix",
    "soft_exceedance",
    "tar_loss",
    "tar_loss_with_exceedances",
    "time_mean",
    "total_variation",
]

Stats = tuple[Tensor, Tensor]


def _f32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------- BN matching


def momentum_stats(
    current: Sequence[Stats],
    previous: Sequence[Stats] | None,
    *,
    momentum: float,
) -> list[Stats]:
    """Blend batch statistics with a running estimate: ``m * previous + (1 - m) * current``.

    Fast (Fang et al., AAAI 2022, ``bn_mmt``) matches these blended statistics instead of the
    raw batch ones, which smooths BN matching over the few generator steps per batch. The same
    formula updates the running estimate after the generator steps: pass the result through
    ``[(m.detach(), v.detach()) for m, v in ...]`` and keep it as the next ``previous``.
    ``previous`` is detached here, so only ``current`` carries gradient.

    Args:
        current: per layer ``(mean [C], var [C])`` of the current batch.
        previous: per layer ``(mean [C], var [C])`` running estimate, or ``None`` (the first
            step: ``current`` is returned as is).
        momentum: ``m`` in ``[0, 1)``; 0 returns ``current``.

    Returns:
        Per layer ``(mean [C], var [C])``.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if previous is None or momentum == 0.0:
        return list(current)
    if len(previous) != len(current):
        raise ValueError(f"{len(current)} current vs {len(previous)} previous layer statistics")
    return [
        (
            momentum * pm.detach() + (1.0 - momentum) * m,
            momentum * pv.detach() + (1.0 - momentum) * v,
        )
        for (m, v), (pm, pv) in zip(current, previous, strict=True)
    ]


def bn_matching(
    feats: Sequence[Tensor | Stats],
    prior: BNPrior,
    *,
    previous: Sequence[Stats] | None = None,
    momentum: float = 0.0,
) -> Tensor:
    """DeepInversion's BatchNorm statistics matching (Yin et al., CVPR 2020).

    ``L_bn = sum_l ||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2`` with
    ``mu_l``, ``var_l`` the per-channel mean and *biased* variance of layer ``l``'s input over
    N and the spatial dimensions (docs/design.md section 4). Norms are Euclidean, not squared.

    Args:
        feats: per BN layer, in the prior's order, either the captured input ``[N, C, *]``
            (e.g. ``list(FeatureTap(...).values())``) or precomputed ``(mean [C], var [C])``
            (e.g. from :class:`~stars.synthesis.priors.BatchStatsTap`).
        prior: the teacher's :class:`~stars.synthesis.priors.BNPrior`.
        previous: Fast's momentum estimate per layer (see :func:`momentum_stats`); ``None``
            matches the raw batch statistics.
        momentum: Fast's ``bn_mmt``; with ``previous`` given, the matched statistics are
            ``momentum * previous + (1 - momentum) * batch``.

    Returns:
        Scalar float32 tensor, ``>= 0``.

    Raises:
        ValueError: the number of layers differs from the prior's.
    """
    if len(feats) != len(prior.layers):
        raise ValueError(
            f"bn_matching: {len(feats)} feature maps for {len(prior.layers)} BN layers"
        )
    stats: list[Stats] = [f if isinstance(f, tuple) else batch_stats(f) for f in feats]
    stats = momentum_stats(stats, previous, momentum=momentum)
    terms: list[Tensor] = []
    for (mean, var), layer in zip(stats, prior.layers, strict=True):
        mean, var = _f32(mean), _f32(var)
        rm = layer.running_mean.to(device=mean.device, dtype=mean.dtype)
        rv = layer.running_var.to(device=var.device, dtype=var.dtype)
        terms.append(torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv))
    return torch.stack(terms).sum()


# ----------------------------------------------------------------------------- logits terms


def class_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """The class (one-hot) term ``L_oh = CE(f_T(x), y)`` (DeepInversion, DAFL, Fast).

    Args:
        logits: ``[N, K]`` teacher logits.
        y: ``[N]`` int64 target classes.

    Returns:
        Scalar, the mean cross-entropy.
    """
    return F.cross_entropy(_f32(logits), y)


def agreement_mask(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """``1[argmax t = argmax s]`` per sample, ``[N]`` bool (no gradient)."""
    return t_logits.argmax(dim=1) == s_logits.argmax(dim=1)


def adversarial_masked_kl(
    t_logits: Tensor, s_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """The generator's adversarial term of Fast / CMI (Fang et al., 2021; 2022).

    ``L_adv = -mean_n KL(p_T,n || p_S,n) * 1[argmax p_T,n = argmax p_S,n] * temperature^2``
    with ``p = softmax(logits / temperature)``: the generator *minimizes* this negative value,
    i.e. maximizes the teacher-student disagreement, but only on samples the student still
    classifies like the teacher, so it cannot win by leaving the teacher's domain. The mean
    runs over the whole batch (masked samples count as 0). The ``temperature^2`` factor keeps
    gradients comparable across temperatures (as in KD); at the default 1 it is 1.

    Args:
        t_logits: ``[N, K]`` teacher logits.
        s_logits: ``[N, K]`` student logits (a spiking student's mean over T).
        temperature: softmax temperature.

    Returns:
        Scalar ``<= 0``.
    """
    t, s = _f32(t_logits) / temperature, _f32(s_logits) / temperature
    log_pt = F.log_softmax(t, dim=1)
    log_ps = F.log_softmax(s, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    mask = agreement_mask(t_logits, s_logits).to(kl.dtype)
    out: Tensor = -(kl * mask).mean() * (temperature * temperature)
    return out


def dafl_activation(features: Tensor) -> Tensor:
    """DAFL's activation term (Chen et al., ICCV 2019): ``-mean |f|``.

    Minimizing it raises the L1 norm of the teacher's penultimate features, which DAFL takes
    as a sign of "real-looking" inputs.

    Args:
        features: ``[N, D]`` (or ``[N, *]``) teacher penultimate features.

    Returns:
        Scalar ``<= 0``.
    """
    return -_f32(features).abs().mean()


def dafl_information_entropy(t_logits: Tensor, *, base: float = 10.0) -> Tensor:
    """DAFL's information-entropy term (Chen et al., ICCV 2019): ``-H(mean_n softmax(t_n))``.

    ``sum_k pbar_k log pbar_k`` with ``pbar`` the batch-mean teacher prediction: minimizing it
    makes the classes balanced over the batch (minimum ``-log K`` at the uniform ``pbar``).
    DAFL's code uses ``log10``, with which its weight (5) was tuned, hence ``base=10`` by
    default; ``base=math.e`` gives nats. ``log pbar`` is computed with ``logsumexp`` so
    that an underflowing class cannot give ``0 * log 0 = nan``.

    Args:
        t_logits: ``[N, K]`` teacher logits.
        base: logarithm base.

    Returns:
        Scalar in ``[-log_base K, 0]``.
    """
    log_p = F.log_softmax(_f32(t_logits), dim=1)
    log_pbar = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    return (log_pbar.exp() * log_pbar).sum() / math.log(base)


def dfad_l1(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """DFAD's discrepancy (Fang et al., 2019): ``mean |t - s|`` over the logits.

    The student minimizes it; the generator *maximizes* it (use ``-dfad_l1`` in ``L_G``).

    Args:
        t_logits: ``[N, K]`` teacher logits.
        s_logits: ``[N, K]`` student logits.

    Returns:
        Scalar ``>= 0``.
    """
    return F.l1_loss(_f32(s_logits), _f32(t_logits))


# ----------------------------------------------------------------------------- image priors


def total_variation(x: Tensor, *, p: Literal[1, 2] = 2) -> Tensor:
    """DeepInversion's total-variation image prior (Yin et al., CVPR 2020).

    Differences between neighbours in four directions (horizontal, vertical and both
    diagonals). ``p=2``: the sum over directions of the Euclidean norm of each difference
    tensor over the whole batch (DeepInversion's ``loss_var_l2``); ``p=1``: the sum over
    directions of the mean absolute difference (its ``loss_var_l1``, without the ``/255``
    meant for [0, 255] images).

    Args:
        x: ``[N, C, H, W]`` images.
        p: 1 or 2.

    Returns:
        Scalar ``>= 0``, 0 for constant images.
    """
    if p not in (1, 2):
        raise ValueError(f"total_variation: p must be 1 or 2, got {p}")
    x = _f32(x)
    diffs = (
        x[..., :, :-1] - x[..., :, 1:],
        x[..., :-1, :] - x[..., 1:, :],
        x[..., 1:, :-1] - x[..., :-1, 1:],
        x[..., :-1, :-1] - x[..., 1:, 1:],
    )
    if p == 2:
        return torch.stack([torch.linalg.vector_norm(d) for d in diffs]).sum()
    # An empty difference (H or W == 1) contributes 0, not the nan of an empty mean.
    return torch.stack([d.abs().mean() if d.numel() else d.sum() for d in diffs]).sum()


def image_l2(x: Tensor) -> Tensor:
    """DeepInversion's L2 image prior: the Euclidean norm of the whole batch ``||x||_2``.

    Args:
        x: ``[N, C, H, W]`` images.

    Returns:
        Scalar ``>= 0``.
    """
    out: Tensor = torch.linalg.vector_norm(_f32(x))
    return out


# ----------------------------------------------------------------------------- RCA


def time_mean(x_seq: Tensor) -> Tensor:
    """Mean over the leading time dimension: ``[T, N, *] -> [N, *]`` (a student's rates/logits)."""
    return x_seq.mean(dim=0)


def relation_matrix(z: Tensor, *, delta: float) -> Tensor:
    """Batch relation matrix of STARS' RCA: ``R = n(z) @ n(z).T``.

    ``n(z) = z / sqrt(|z|^2 + delta)`` row-wise: cosine similarity with a safe norm. A zero
    row (a spiking student's silent sample) gives a zero row of ``R`` and a gradient bounded
    by ``1 / sqrt(delta)``, where ``F.normalize`` would give ``1 / eps`` (docs/design.md's measured
    pitfall). The diagonal is ``|z|^2 / (|z|^2 + delta)``: 1 up to ``delta``.

    Args:
        z: ``[B, D]`` features or logits (``[B, *]`` is flattened beyond dim 1).
        delta: the safe-norm constant (``RCAConfig.delta``), ``> 0``.

    Returns:
        ``[B, B]`` symmetric, entries in ``[-1, 1]``.
    """
    if delta <= 0:
        raise ValueError(f"relation_matrix: delta must be > 0, got {delta}")
    z = _f32(z).flatten(1)
    n = z * torch.rsqrt(z.pow(2).sum(dim=1, keepdim=True) + delta)
    with torch.autocast(z.device.type, enabled=False):  # else a bf16/fp16 matmul under autocast
        return n @ n.T


def rca_loss(z_t: Tensor, z_s: Tensor, *, delta: float) -> Tensor:
    """Relational Consistency Alignment (STARS): ``||R(z_T) - R(z_S)||_F^2 / B^2``.

    Teacher and student should agree on how the samples of a batch relate to each other.
    Feature widths may differ between the two sides; only the batch size must match. For a
    spiking student pass ``time_mean(features_seq)`` (docs/design.md: features averaged over T).

    Args:
        z_t: ``[B, D_T]`` teacher penultimate features (or logits).
        z_s: ``[B, D_S]`` student features averaged over time (or logits).
        delta: safe-norm constant, see :func:`relation_matrix`.

    Returns:
        Scalar in ``[0, 4]``; 0 when the features are equal or positively rescaled per sample
        (up to ``delta``); invariant to a common permutation of the batch.
    """
    if z_t.shape[0] != z_s.shape[0]:
        raise ValueError(f"rca_loss: batch sizes differ ({z_t.shape[0]} vs {z_s.shape[0]})")
    diff = relation_matrix(z_t, delta=delta) - relation_matrix(z_s, delta=delta)
    return diff.pow(2).mean()


def rca_adversarial(
    z_t: Tensor,
    z_s: Tensor,
    t_logits: Tensor,
    s_logits: Tensor,
    *,
    delta: float,
) -> Tensor:
    """Gated adversarial RCA for the generator: ``-L_rca`` over the agreed samples only.

    Only the samples ``A = {n : argmax t_n = argmax s_n}`` enter: the loss is
    ``-||R_T[A, A] - R_S[A, A]||_F^2 / |A|^2``. This is our guard from docs/design.md's measured
    pitfalls: maximizing RCA over the whole batch drove the images out of the teacher's domain
    (BN term stuck near 60, TAR saturated); restricting it to samples the student already
    agrees on, like Fast's masked KL, keeps the generator from winning by producing inputs
    neither network recognizes. Samples outside ``A`` receive no gradient from this term.
    Computed with a mask (no data-dependent shapes, no host sync). Returns an exact 0 with a
    gradient graph (zero gradients) when fewer than 2 samples agree.

    Args:
        z_t: ``[B, D_T]`` teacher features (or logits).
        z_s: ``[B, D_S]`` student features averaged over time (or logits).
        t_logits: ``[B, K]`` teacher logits (for the gate only).
        s_logits: ``[B, K]`` student logits, mean over time (for the gate only).
        delta: safe-norm constant.

    Returns:
        Scalar in ``[-4, 0]``, to be minimized by the generator.
    """
    if z_t.shape[0] != z_s.shape[0]:
        raise ValueError(f"rca_adversarial: batch sizes differ ({z_t.shape[0]} vs {z_s.shape[0]})")
    diff2 = (relation_matrix(z_t, delta=delta) - relation_matrix(z_s, delta=delta)).pow(2)
    mask = agreement_mask(t_logits, s_logits).to(diff2.dtype)
    count = mask.sum()
    pair = mask[:, None] * mask[None, :]
    enough = (count >= 2).to(diff2.dtype)
    return -(pair * diff2).sum() / count.clamp_min(1.0).pow(2) * enough


# ----------------------------------------------------------------------------- TAR


def soft_exceedance(h: Tensor, theta: Tensor, tau: Tensor) -> Tensor:
    """Soft exceedance of STARS' TAR: ``e_kc = mean_{N,*} sigmoid((h - theta_kc) / tau_c)``.

    A differentiable stand-in for the fraction of activations of channel ``c`` above
    ``theta_kc``; it tends to that fraction as ``tau -> 0``. Keep ``tau`` relative to the
    channel's spread (``tau_rel * std``): if every activation is many ``tau`` away from the
    thresholds the sigmoids saturate and the gradient vanishes.

    Args:
        h: ``[N, C, *]`` activations (``[N, C]`` or ``[N, C, H, W]``).
        theta: ``[K, C]`` thresholds.
        tau: ``[C]`` positive temperatures.

    Returns:
        ``[K, C]`` in ``[0, 1]``, float32.
    """
    if h.ndim < 2 or theta.ndim != 2 or theta.shape[1] != h.shape[1] or tau.shape != (h.shape[1],):
        raise ValueError(
            "soft_exceedance: expected h [N, C, *], theta [K, C], tau [C]; got "
            f"{tuple(h.shape)}, {tuple(theta.shape)}, {tuple(tau.shape)}"
        )
    x = _f32(h)
    c = x.shape[1]
    view = (1, c) + (1,) * (x.ndim - 2)
    theta = theta.to(device=x.device, dtype=x.dtype)
    tau = tau.to(device=x.device, dtype=x.dtype)
    scale = tau.reciprocal().view(view)
    shift = (-theta / tau).view(theta.shape[0], *view)
    if theta.requires_grad or tau.requires_grad:  # the general (slower) autograd path
        dims = (0, *range(2, x.ndim))
        return torch.stack(
            [
                torch.sigmoid(torch.addcmul(shift[k], x, scale)).mean(dim=dims)
                for k in range(len(shift))
            ]
        )
    out: Tensor = _SoftExceedance.apply(x, scale, shift)
    return out


def _channel_sum(s: Tensor) -> Tensor:
    """``s.sum(dim=(0, 2, ...))`` for ``[N, C, *]``; summing the contiguous inner dims first is
    2-3x faster on CPU than one reduction over the strided ones."""
    if s.ndim > 2 and s.is_contiguous():
        return s.flatten(2).sum(-1).sum(0)
    return s.sum(dim=(0, *range(2, s.ndim)))


class _SoftExceedance(torch.autograd.Function):
    """``e_kc = mean sigmoid(x * scale_c + shift_kc)`` with a lean backward: it keeps the
    sigmoids and computes ``d e / d x = s (1 - s) scale / M`` in one pass per threshold,
    instead of autograd's chain through mean, sigmoid and the affine map (TAR's share of a
    synthesis step). Gradient with respect to ``x`` only: the thresholds are constants."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        z = x * scale
        # the last threshold reuses z's buffer: one temporary fewer per layer
        sig = [torch.add(z, shift[k]).sigmoid_() for k in range(shift.shape[0] - 1)]
        sig.append(z.add_(shift[-1]).sigmoid_())
        ctx.save_for_backward(scale, *sig)
        count = x.numel() // x.shape[1]
        ctx.count = count
        return torch.stack([_channel_sum(s) for s in sig]) / count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_e: Tensor) -> tuple[Tensor | None, None, None]:
        scale, *sig = ctx.saved_tensors
        view = scale.shape
        grad: Tensor | None = None
        for k, s in enumerate(sig):
            coef = grad_e[k].view(view) * scale / ctx.count
            # coef * s * (1 - s) in one fused pass
            part: Tensor = torch.ops.aten.sigmoid_backward(coef.expand_as(s), s)
            grad = part if grad is None else grad.add_(part)
        return grad, None, None


def tar_loss(feats: Sequence[Tensor], prior: TailPrior) -> Tensor:
    """Tail-Aware Regularization (STARS): match soft exceedances to target tail masses.

    ``L_tar = sum_l mean_{k,c} (e_lkc(x) - p_lkc)^2 / (p_lkc (1 - p_lkc))`` (docs/design.md
    section 4): summed over layers like ``L_bn``, each threshold scaled by its Bernoulli
    variance so that rare tails (kappa = 2) count as much as common ones (kappa = 1).

    Args:
        feats: per layer, in the prior's order, the activations ``[N, C, *]`` at the site the
            prior was built for (by default each teacher BN layer's input).
        prior: :class:`~stars.synthesis.priors.TailPrior` (``theta [K, C]``, ``tau [C]``,
            ``p [K, C]`` per layer).

    Returns:
        Scalar ``>= 0``.

    Raises:
        ValueError: the number of layers differs from the prior's.
    """
    return tar_loss_with_exceedances(feats, prior)[0]


def tar_loss_with_exceedances(
    feats: Sequence[Tensor], prior: TailPrior
) -> tuple[Tensor, list[Tensor]]:
    """:func:`tar_loss` and the soft exceedances ``e_l [K, C]`` it compared, per layer.

    The exceedances let a caller check that no sigmoid is saturated (docs/design.md's pitfall: an
    exceedance stuck at 0 means no activation is near its threshold, hence no gradient).
    """
    if len(feats) != len(prior.layers):
        raise ValueError(f"tar_loss: {len(feats)} feature maps for {len(prior.layers)} layers")
    terms: list[Tensor] = []
    exceedances: list[Tensor] = []
    for h, layer in zip(feats, prior.layers, strict=True):
        e = soft_exceedance(h, layer.theta, layer.tau)
        p = layer.p.to(device=e.device, dtype=e.dtype)
        terms.append(((e - p).pow(2) / (p * (1.0 - p))).mean())
        exceedances.append(e)
    return torch.stack(terms).sum(), exceedances
