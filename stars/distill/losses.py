"""Student objectives: pure functions, tensors in, scalar tensor out (docs/design.md section 4).

``L_S = tau^2 KL(softmax(f_T(x) / tau) || softmax(mean_t f_S(x)_t / tau)) + beta_rca L_rca``:
:func:`kd_loss` on the time-averaged student logits (or :func:`tet_kd_loss`, one KD term per
time step) plus :func:`student_rca` (or :func:`student_rca_per_step`). The spike-aware TAR term
of the student is :func:`stars.synthesis.spike_tar.spike_tail_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stars.synthesis.losses import rca_loss, time_mean

__all__ = ["kd_loss", "student_rca", "student_rca_per_step", "tet_kd_loss"]


def _f32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kd_loss(s_logits: Tensor, t_logits: Tensor, *, temperature: float) -> Tensor:
    """Knowledge distillation (Hinton et al., 2015): ``tau^2 KL(p_T || p_S)``, batch mean.

    ``p = softmax(logits / tau)``; the KL is summed over classes and averaged over samples
    (``reduction="batchmean"``); ``tau^2`` keeps the gradient scale independent of ``tau``.

    Args:
        s_logits: ``[N, K]`` student logits (a spiking student's mean over T).
        t_logits: ``[N, K]`` teacher logits (detach them unless the teacher should learn).
        temperature: ``tau > 0``.

    Returns:
        Scalar ``>= 0`` (up to rounding), 0 when the logits are equal.
    """
    if s_logits.shape != t_logits.shape:
        raise ValueError(
            f"kd_loss: shapes differ ({tuple(s_logits.shape)} vs {tuple(t_logits.shape)})"
        )
    log_ps = F.log_softmax(_f32(s_logits) / temperature, dim=-1)
    log_pt = F.log_softmax(_f32(t_logits) / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def tet_kd_loss(s_logits_seq: Tensor, t_logits: Tensor, *, temperature: float) -> Tensor:
    """KD applied at every time step (TET-style, Deng et al., ICLR 2022): ``mean_t kd(s_t, t)``.

    Args:
        s_logits_seq: ``[T, N, K]`` student logits per step.
        t_logits: ``[N, K]`` teacher logits.
        temperature: ``tau > 0``.

    Returns:
        Scalar ``>= 0``.
    """
    if s_logits_seq.ndim != 3 or s_logits_seq.shape[1:] != t_logits.shape:
        raise ValueError(
            "tet_kd_loss: expected s_logits_seq [T, N, K] and t_logits [N, K]; got "
            f"{tuple(s_logits_seq.shape)}, {tuple(t_logits.shape)}"
        )
    steps = s_logits_seq.shape[0]
    t_rep = t_logits.unsqueeze(0).expand(steps, -1, -1)
    # batchmean over T*N rows equals the mean over t of each step's batchmean.
    return kd_loss(s_logits_seq.flatten(0, 1), t_rep.flatten(0, 1), temperature=temperature)


def student_rca(s_features_seq: Tensor, t_features: Tensor, *, delta: float) -> Tensor:
    """The student's RCA term (STARS): ``L_rca(z_T, mean_t z_S,t)``.

    Args:
        s_features_seq: ``[T, N, D_S]`` student penultimate features (firing rates) per step,
            or ``[T, N, K]`` logits; averaged over T first.
        t_features: ``[N, D_T]`` teacher penultimate features or logits.
        delta: safe-norm constant (``RCAConfig.delta``).

    Returns:
        Scalar in ``[0, 4]``.
    """
    if s_features_seq.ndim < 3:
        raise ValueError(
            f"student_rca: expected [T, N, D] features, got {tuple(s_features_seq.shape)}"
        )
    return rca_loss(t_features, time_mean(s_features_seq), delta=delta)


def student_rca_per_step(s_features_seq: Tensor, t_features: Tensor, *, delta: float) -> Tensor:
    """RCA at every time step: ``mean_t L_rca(z_T, z_S,t)`` (``rca.student_per_step``).

    Where :func:`student_rca` asks the *time-averaged* rates to relate the samples as the
    teacher does, this asks it of each step's features (or logits), so that a student whose
    steps disagree with each other cannot satisfy it on average only.

    Args:
        s_features_seq: ``[T, N, D_S]`` student features (or logits) per step.
        t_features: ``[N, D_T]`` teacher features (or logits).
        delta: safe-norm constant.

    Returns:
        Scalar in ``[0, 4]``; equal to :func:`student_rca` when every step is the same.
    """
    if s_features_seq.ndim < 3:
        raise ValueError(
            f"student_rca_per_step: expected [T, N, D] features, got {tuple(s_features_seq.shape)}"
        )
    return torch.stack([rca_loss(t_features, z, delta=delta) for z in s_features_seq]).mean()
