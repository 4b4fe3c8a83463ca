"""The student's side of distillation: one KD step on a batch of synthetic images.

``L_S = tau^2 KL(softmax(f_T(x)/tau) || softmax(mean_t f_S(x)_t / tau)) + beta_rca L_rca
+ beta_spike L_spike`` (docs/design.md section 4; ``loss: tet`` applies the KD term at every
time step instead; ``L_spike`` is spike-aware TAR, the student's soft threshold crossings
against the teacher's tail exceedances on the same batch). The
batch is augmented per sample (random crop with 4-pixel padding and horizontal flip, as Fast
trains on its image pool); the augmentation draws from the distiller's own generator. A step
whose loss or gradients are not finite is skipped (no parameter changes) and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stars.distill.losses import kd_loss, student_rca, student_rca_per_step, tet_kd_loss
from stars.distill.protocols import StepOutput
from stars.models.protocols import SpikingStudent, Teacher
from stars.neurons.membrane import MembraneTap
from stars.runtime import autocast
from stars.synthesis.priors import FeatureTap
from stars.synthesis.spike_tar import SpikeTailTerm

__all__ = ["KDDistiller", "random_crop_flip"]


def random_crop_flip(x: Tensor, *, padding: int, generator: torch.Generator) -> Tensor:
    """Per-sample random crop (zero padding) and horizontal flip of ``x [N, C, H, W]``."""
    n, _, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [N, H, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [N, 1, W]
        idx = torch.arange(n, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x).contiguous()


class KDDistiller:
    """KD (+ student-side RCA) training of a spiking student against a frozen teacher.

    Args:
        student: the spiking student (``forward_features -> (features_seq, logits_seq)``).
        teacher: the frozen teacher (``forward_features -> (features, logits)``).
        optimizer, scheduler: stepped once per :meth:`step`.
        temperature: KD temperature ``tau``.
        loss: ``kd`` (on the mean logits over T) or ``tet`` (per time step).
        rca_weight: ``beta_rca``; ``rca_features`` and ``rca_delta`` as in :class:`RCAConfig`;
            ``rca_per_step``: RCA at each time step (``rca.student_per_step``).
        spike, spike_weight: spike-aware TAR and its weight ``beta_spike`` (off when 0).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 uses a grad scaler).
        seed: seeds the augmentation generator.
    """

    def __init__(
        self,
        student: SpikingStudent,
        teacher: Teacher,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        temperature: float,
        loss: str = "kd",
        rca_weight: float = 0.0,
        rca_features: str = "penultimate",
        rca_delta: float = 1e-4,
        rca_per_step: bool = False,
        spike: SpikeTailTerm | None = None,
        spike_weight: float = 0.0,
        device: torch.device | None = None,
        precision: str = "fp32",
        seed: int = 0,
        augment: bool = True,
        features_fn: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
        distributed: bool = False,
    ) -> None:
        self.student = student
        self.teacher = teacher
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.temperature = temperature
        self.loss_kind = loss
        self.rca_weight = rca_weight
        self.rca_features = rca_features
        self.rca_delta = rca_delta
        self.rca_per_step = rca_per_step
        self.spike = spike if spike_weight > 0 else None
        self.spike_weight = spike_weight
        self.device = device or torch.device("cpu")
        self.precision = precision
        self.augment = augment
        # Under DDP the student's forward_features is called through the DDP wrapper, and
        # backward always runs (a rank that skipped it would leave the others waiting in the
        # gradient all-reduce); non-finite gradients are then the same on every rank.
        self.features_fn = features_fn
        self.distributed = distributed
        self.rng = torch.Generator().manual_seed(seed)
        self.scaler = torch.amp.GradScaler(
            enabled=precision == "fp16" and self.device.type == "cuda"
        )
        self.skipped = 0
        self.bad_in_a_row = 0

    def step(self, images: Tensor) -> StepOutput:
        """One optimizer step of the student on ``images [N, C, H, W]``."""
        x = images.to(self.device, non_blocking=True)
        if self.augment:
            x = random_crop_flip(x, padding=4, generator=self.rng)
        self.student.train()
        spike = self.spike
        t_bns: list[nn.Module] = []
        neurons: list[nn.Module] = []
        tapped: list[nn.Module] = []
        pairs: list[tuple[int, int]] = []
        if spike is not None:
            t_bns = list(self.teacher.bn_layers())
            neurons = [m for _, m in self.student.spiking_neurons()]
            pairs = spike.pairs(len(neurons))
            t_bns = [t_bns[t] for _, t in pairs]
            tapped = [neurons[s] for s, _ in pairs]
        with (
            torch.no_grad(),
            autocast(self.device, self.precision),
            FeatureTap(t_bns, detach=True) as t_tap,
        ):
            t_feats, t_logits = self.teacher.forward_features(x)
            t_acts = {t: t_tap[m] for (_, t), m in zip(pairs, t_bns, strict=True)}
        spike_value: Tensor | None = None
        with autocast(self.device, self.precision), MembraneTap(tapped) as m_tap:
            fwd = self.features_fn or self.student.forward_features
            s_feats_seq, s_logits_seq = fwd(x)
            if spike is not None:
                spike_value = spike.loss(t_acts, m_tap, neurons)
        t_logits = t_logits.float()
        if self.loss_kind == "tet":
            kd = tet_kd_loss(s_logits_seq.float(), t_logits, temperature=self.temperature)
        else:
            kd = kd_loss(s_logits_seq.float().mean(0), t_logits, temperature=self.temperature)
        parts: dict[str, Tensor] = {"kd": kd}
        loss = kd
        if self.rca_weight > 0:
            rca_fn = student_rca_per_step if self.rca_per_step else student_rca
            if self.rca_features == "logits":
                rca = rca_fn(s_logits_seq.float(), t_logits, delta=self.rca_delta)
            else:
                rca = rca_fn(s_feats_seq.float(), t_feats.float(), delta=self.rca_delta)
            parts["rca"] = rca
            loss = loss + self.rca_weight * rca
        if spike_value is not None:
            parts["spike_tar"] = spike_value
            loss = loss + self.spike_weight * spike_value
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite or self.distributed:
            torch.autograd.backward(self.scaler.scale(loss))
            finite = finite and all(
                torch.isfinite(p.grad).all()
                for p in self.student.parameters()
                if p.grad is not None
            )
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.bad_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.bad_in_a_row += 1
        self.scheduler.step()
        out = {k: float(v.detach()) for k, v in parts.items()}
        out["loss"] = float(loss.detach())
        out["finite"] = float(finite)
        with torch.no_grad():
            agree = s_logits_seq.mean(0).argmax(1) == t_logits.argmax(1)
            out["agreement"] = float(agree.float().mean())
        return StepOutput(loss=loss.detach(), parts=out)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self.rng.get_state(),
            "skipped": self.skipped,
            "bad_in_a_row": self.bad_in_a_row,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.rng.set_state(state["rng"])
        self.skipped = int(state["skipped"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
