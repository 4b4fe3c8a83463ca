"""The generator objective shared by every synthesizer, with the STARS plug-in.

``L_G = l_bn L_bn + l_oh L_oh + l_adv L_adv + l_rca (±L_rca) + l_tar L_tar``
(docs/design.md section 4), plus the baselines' own terms (DAFL's activation and information
entropy, DFAD's L1 discrepancy, DeepInversion's image priors). A term whose weight is 0 is
not added to the loss, so with ``lambda_rca = lambda_tar = 0`` the loss graph, the gradients
and hence the images are those of the baseline, bit for bit. Such terms are still
*measured* (under ``no_grad``, no random numbers drawn) when ``measure_inactive`` is set, so
a baseline run logs the TAR and RCA values it would have had.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from stars.config import StarsConfig
from stars.models.protocols import Network, SpikingStudent, Teacher
from stars.neurons.membrane import MembraneTap
from stars.runtime import autocast
from stars.synthesis import losses as L
from stars.synthesis.priors import (
    BNPrior,
    FeatureTap,
    TailPrior,
    batch_stats,
    extract_bn_prior,
    extract_tail_prior,
)
from stars.synthesis.spike_tar import SpikeTailTerm
from stars.synthesis.weights import TermWeights

__all__ = ["ObjectiveOutput", "SynthesisObjective", "TermWeights", "frozen"]

Stats = tuple[Tensor, Tensor]
_Net = TypeVar("_Net", bound=Network)


def _indices(chosen: tuple[int, ...], n: int) -> list[int]:
    """Layer indices (negative from the end) as non-negative ones; out of range is an error."""
    out = [i + n if i < 0 else i for i in chosen]
    bad = [c for c, i in zip(chosen, out, strict=True) if not 0 <= i < n]
    if bad:
        raise ValueError(f"stars.tar.layers {bad} out of range for {n} BN layers")
    return out


def _subset(prior: TailPrior, chosen: tuple[int, ...] | None) -> TailPrior:
    if chosen is None:
        return prior
    idx = _indices(chosen, len(prior.layers))
    return TailPrior(tuple(prior.layers[i] for i in idx), prior.source, prior.levels)


@dataclass
class ObjectiveOutput:
    """The weighted total, each term unweighted (``Tensor`` with graph where active), the
    teacher's logits and the batch statistics of the teacher's BN inputs."""

    total: Tensor
    terms: dict[str, Tensor]
    t_logits: Tensor
    stats: list[Stats] = field(default_factory=list)


def rca_calibration_due(
    objective: SynthesisObjective, terms: Mapping[str, Tensor], x: Tensor
) -> bool:
    """Whether this step calibrates lambda_rca: asked for, not done yet (or
    ``recalibrate_every`` steps since the last time), RCA on and measured with a graph to the
    images (not under ``no_grad``)."""
    rca = terms.get("rca")
    every = objective.stars.rca.recalibrate_every
    return (
        (not objective.rca_calibrated or (every is not None and objective.rca_age >= every))
        and objective.stars.rca.weight > 0
        and rca is not None
        and rca.requires_grad
        and terms["bn"].requires_grad
        and x.requires_grad
        and objective.weights.bn > 0
        and objective.scale > 0
    )


@contextmanager
def frozen(model: _Net) -> Iterator[_Net]:
    """Eval mode and no parameter gradients inside the block; both restored on exit.

    Used for the student during synthesis: its parameters, gradients and BN running
    statistics are left exactly as they were.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class SynthesisObjective:
    """Computes ``L_G`` for a batch of images.

    Args:
        teacher: a frozen teacher (``forward_features`` and ``bn_layers()``).
        weights: the baseline's term weights.
        stars: the STARS plug-in configuration.
        student_vth: the student's firing threshold (for ``tar.source: student-vth``).
        bn_momentum: Fast's ``bn_mmt`` (0: match raw batch statistics).
        measure_inactive: also measure zero-weight STARS terms, without gradient.
    """

    def __init__(
        self,
        teacher: Teacher,
        *,
        weights: TermWeights,
        stars: StarsConfig,
        student_vth: float | None = None,
        bn_momentum: float = 0.0,
        measure_inactive: bool = True,
        precision: str = "fp32",
    ) -> None:
        self.teacher = teacher
        self.weights = weights
        self.stars = stars
        self.student_vth = student_vth
        self.bn_momentum = bn_momentum
        self.measure_inactive = measure_inactive
        # bf16 autocast for the teacher and student forwards; fp16 would need a grad scaler
        # per generator optimizer, so synthesis stays fp32 under ``precision: fp16``.
        self.precision = precision if precision == "bf16" else "fp32"
        self.bn_layers: list[nn.Module] = list(teacher.bn_layers())
        self.bn_prior: BNPrior = extract_bn_prior(self.bn_layers)
        self.tail_prior: TailPrior | None = None
        if stars.tar.site == "teacher":
            self.tail_prior = _subset(
                extract_tail_prior(self.bn_prior, stars.tar, student_vth=student_vth),
                stars.tar.layers,
            )
        self.spike = SpikeTailTerm(stars.spike_tar, self.bn_prior)
        """Spike-aware TAR (``stars.spike_tar``)."""
        self.scale = 1.0
        """``stars.schedule``'s factor on the STARS weights at the current epoch."""
        self.momentum_state: list[Stats] | None = None
        self.rca_weight: float = stars.rca.weight
        """lambda_rca in effect: ``stars.rca.weight``, or the calibrated value once
        ``stars.rca.grad_ratio`` has been applied (:attr:`rca_calibrated`)."""
        self.rca_calibrated = False
        self.rca_age = 0
        """Generator steps since lambda_rca was last calibrated (``recalibrate_every``)."""

    def to(self, device: torch.device) -> SynthesisObjective:
        """Move the priors to ``device``."""
        self.bn_prior = self.bn_prior.to(device)
        if self.tail_prior is not None:
            self.tail_prior = self.tail_prior.to(device)
        if self.momentum_state is not None:
            self.momentum_state = [(m.to(device), v.to(device)) for m, v in self.momentum_state]
        self.spike.to(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Apply ``stars.schedule`` for 0-based ``epoch`` (a factor on every STARS weight)."""
        self.scale = self.stars.schedule.factor(epoch)

    @property
    def needs_student(self) -> bool:
        w, s = self.weights, self.stars
        return (
            w.adv > 0
            or w.dfad > 0
            or s.rca.weight > 0
            or s.tar.site == "student"
            or s.spike_tar.weight > 0
        )

    def update_momentum(self, stats: list[Stats]) -> None:
        """Fast: fold a finished batch's statistics into the running estimate."""
        if self.bn_momentum <= 0:
            return
        detached = [(m.detach(), v.detach()) for m, v in stats]
        self.momentum_state = L.momentum_stats(
            detached, self.momentum_state, momentum=self.bn_momentum
        )

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        student: SpikingStudent | None,
        *,
        student_active: bool = True,
        grad_inactive: bool = False,
        calibrate: bool = True,
    ) -> ObjectiveOutput:
        """``L_G`` for images ``x [N, C, H, W]`` and labels ``y [N]``.

        ``student`` is run (frozen by the caller) only when a term needs it and
        ``student_active`` (Fast turns the adversarial terms off during warm-up).
        ``grad_inactive`` keeps the graph of zero-weight STARS terms (for :meth:`grad_norms`).
        ``calibrate``: this call may calibrate lambda_rca (``stars.rca.grad_ratio``); a
        measurement (:meth:`grad_norms`) does not.
        """
        w, cfg = self.weights, self.stars
        with FeatureTap(self.bn_layers) as tap, autocast(x.device, self.precision):
            t_feats, t_logits = self.teacher.forward_features(x)
            acts = [tap[m] for m in self.bn_layers]
        stats = [batch_stats(a) for a in acts]
        terms: dict[str, Tensor] = {}
        active: dict[str, float] = {}

        def add(name: str, value: Tensor, weight: float) -> None:
            terms[name] = value
            if weight != 0.0:
                active[name] = weight

        add(
            "bn",
            L.bn_matching(
                stats, self.bn_prior, previous=self.momentum_state, momentum=self.bn_momentum
            ),
            w.bn,
        )
        targets = t_logits.argmax(1).detach() if w.pseudo_labels else y
        add("oh", L.class_cross_entropy(t_logits, targets), w.oh)
        if w.act:
            add("act", L.dafl_activation(t_feats), w.act)
        if w.ie:
            add("ie", L.dafl_information_entropy(t_logits), w.ie)
        if w.tv_l1:
            add("tv_l1", L.total_variation(x, p=1), w.tv_l1)
        if w.tv_l2:
            add("tv_l2", L.total_variation(x, p=2), w.tv_l2)
        if w.l2:
            add("l2", L.image_l2(x), w.l2)

        s_feats: Tensor | None = None
        s_logits: Tensor | None = None
        s_acts: list[Tensor] = []
        if student is not None and student_active and self.needs_student:
            s_bns = list(student.bn_layers()) if cfg.tar.site == "student" else []
            if cfg.tar.site == "student" and cfg.tar.layers is not None:
                s_bns = [s_bns[i] for i in _indices(cfg.tar.layers, len(s_bns))]
            spike_w = cfg.spike_tar.weight * self.scale
            neurons: list[nn.Module] = []
            listed = getattr(student, "spiking_neurons", None)
            if spike_w > 0 or (self.measure_inactive and callable(listed)):
                if not callable(listed):
                    raise TypeError("stars.spike_tar needs a student with spiking_neurons()")
                neurons = [m for _, m in listed()]
            with (
                FeatureTap(s_bns) as s_tap,
                MembraneTap(self.spike.tapped(neurons) if neurons else []) as m_tap,
                autocast(x.device, self.precision),
            ):
                s_feats_seq, s_logits_seq = student.forward_features(x)
                s_acts = [s_tap[m] for m in s_bns]
                s_feats, s_logits = L.time_mean(s_feats_seq), L.time_mean(s_logits_seq)
                if neurons:
                    # ---- STARS: spike-aware TAR (the potentials are read inside the tap)
                    with torch.set_grad_enabled(
                        (spike_w > 0 or grad_inactive) and torch.is_grad_enabled()
                    ):
                        adversarial = cfg.spike_tar.role == "adversarial"
                        gate = (
                            L.agreement_mask(t_logits, s_logits).float()
                            if adversarial and cfg.spike_tar.gate
                            else None
                        )
                        value = self.spike.loss(dict(enumerate(acts)), m_tap, neurons, gate=gate)
                    add("spike_tar", -value if adversarial else value, spike_w)
            if w.adv:
                add("adv", L.adversarial_masked_kl(t_logits, s_logits), w.adv)
            if w.dfad:
                add("dfad", -L.dfad_l1(t_logits, s_logits), w.dfad)

        # ---- STARS: RCA
        if s_feats is not None and s_logits is not None:
            use_logits = cfg.rca.features == "logits"
            z_t = t_logits if use_logits else t_feats
            z_s = s_logits if use_logits else s_feats
            rca_w = self.rca_weight * self.scale
            if rca_w > 0 or self.measure_inactive:
                with torch.set_grad_enabled(
                    (rca_w > 0 or grad_inactive) and torch.is_grad_enabled()
                ):
                    if cfg.rca.role == "adversarial":
                        rca = L.rca_adversarial(z_t, z_s, t_logits, s_logits, delta=cfg.rca.delta)
                    else:
                        rca = L.rca_loss(z_t, z_s, delta=cfg.rca.delta)
                add("rca", rca, rca_w)

        # ---- STARS: TAR
        tar_w = cfg.tar.weight * self.scale
        if tar_w > 0 or self.measure_inactive:
            prior, feats = self.tail_prior, acts
            if cfg.tar.layers is not None:
                feats = [acts[i] for i in _indices(cfg.tar.layers, len(acts))]
            if cfg.tar.site == "student":
                prior, feats = None, s_acts
                if student is not None and s_acts:
                    s_prior = extract_bn_prior(student.bn_layers())
                    prior = _subset(
                        extract_tail_prior(
                            s_prior.to(x.device), cfg.tar, student_vth=self.student_vth
                        ),
                        cfg.tar.layers,
                    )
            if prior is not None:
                with torch.set_grad_enabled(
                    (tar_w > 0 or grad_inactive) and torch.is_grad_enabled()
                ):
                    tar, exceed = L.tar_loss_with_exceedances(feats, prior)
                add("tar", tar, tar_w)
                # Saturation check: the share of (layer, kappa, channel) whose soft exceedance
                # is ~0 or ~1, i.e. whose sigmoids give (almost) no gradient to the images.
                with torch.no_grad():
                    flat = torch.cat([e.detach().flatten() for e in exceed])
                    stuck = (flat < 1e-4) | (flat > 1 - 1e-4)
                    terms["tar_saturated"] = stuck.float().mean()

        if calibrate and cfg.rca.grad_ratio is not None:
            if rca_calibration_due(self, terms, x):
                active["rca"] = self._calibrate_rca(terms["bn"], terms["rca"], x) * self.scale
            elif self.rca_calibrated and x.requires_grad:
                self.rca_age += 1
        if cfg.rca.grad_ratio is not None:
            terms["rca_weight"] = torch.tensor(self.rca_weight)
        total = torch.zeros((), device=x.device)
        for name, weight in active.items():
            total = total + weight * terms[name]
        return ObjectiveOutput(total, terms, t_logits, stats)

    def _calibrate_rca(self, bn: Tensor, rca: Tensor, x: Tensor) -> float:
        """Set :attr:`rca_weight` so that ``|d(w rca)/dx| = grad_ratio * |d(l_bn bn)/dx|``.

        Left uncalibrated (retried at the next step) while RCA has no gradient yet: fewer
        than two samples on which teacher and student agree."""
        ratio = self.stars.rca.grad_ratio
        assert ratio is not None
        (g_bn,) = torch.autograd.grad(bn * self.weights.bn, x, retain_graph=True, allow_unused=True)
        (g_rca,) = torch.autograd.grad(rca, x, retain_graph=True, allow_unused=True)
        n_bn = 0.0 if g_bn is None else float(g_bn.norm())
        n_rca = 0.0 if g_rca is None else float(g_rca.norm())
        if n_rca > 0 and n_bn > 0 and math.isfinite(n_bn / n_rca):
            self.rca_weight = ratio * n_bn / n_rca
            self.rca_calibrated = True
            self.rca_age = 1
        return self.rca_weight

    def grad_norms(
        self, x: Tensor, y: Tensor, student: SpikingStudent | None
    ) -> Mapping[str, float]:
        """The norm of each term's gradient on ``x`` (weighted as in ``L_G``, STARS terms at
        weight 1 when off). Logged at the start of synthesis to calibrate the STARS weights
        against the BN term."""
        x = x.detach().requires_grad_(True)
        if student is not None:
            with frozen(student):
                out = self(x, y, student, grad_inactive=True, calibrate=False)
        else:
            out = self(x, y, student, grad_inactive=True, calibrate=False)
        weights = {
            "bn": self.weights.bn,
            "oh": self.weights.oh,
            "adv": self.weights.adv,
            "rca": self.rca_weight or 1.0,
            "tar": self.stars.tar.weight or 1.0,
            "spike_tar": self.stars.spike_tar.weight or 1.0,
        }
        norms: dict[str, float] = {}
        for name, weight in weights.items():
            term = out.terms.get(name)
            if term is None or not term.requires_grad or weight == 0:
                continue
            (g,) = torch.autograd.grad(term * weight, x, retain_graph=True, allow_unused=True)
            norms[name] = 0.0 if g is None else float(g.norm())
        return norms
