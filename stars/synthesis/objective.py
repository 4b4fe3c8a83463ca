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

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from stars.config import StarsConfig
from stars.models.protocols import Network, SpikingStudent, Teacher
from stars.neurons.membrane import MembraneTap
from stars.runtime import autocast, eager_forwards
from stars.synthesis import losses as L
from stars.synthesis.priors import (
    BNPrior,
    FeatureTap,
    TailPrior,
    batch_stats,
    compiled_batch_stats,
    extract_bn_prior,
    extract_tail_prior,
)
from stars.synthesis.spike_tar import SpikeTailTerm
from stars.synthesis.terms import (
    AdversarialTerm,
    BNTerm,
    ClassTerm,
    DFADTerm,
    FunctionTerm,
    RCATerm,
    SpikeTARTerm,
    TARTerm,
    Term,
    TermBatch,
    subset_prior,
)
from stars.synthesis.weights import TermWeights

__all__ = ["ObjectiveOutput", "SynthesisObjective", "TermWeights", "frozen"]

Stats = tuple[Tensor, Tensor]
_Net = TypeVar("_Net", bound=Network)


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
    """Whether this step calibrates lambda_rca (:meth:`~stars.synthesis.terms.RCATerm.
    calibration_due`, with the schedule's factor not 0)."""
    return objective.rca.calibration_due(terms, x, objective.weights.bn) and objective.scale > 0


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
    """Computes ``L_G`` for a batch of images, iterating its :attr:`terms`
    (:mod:`stars.synthesis.terms`) in order.

    Args:
        teacher: a frozen teacher (``forward_features`` and ``bn_layers()``).
        weights: the baseline's term weights.
        stars: the STARS plug-in configuration.
        student_vth: the student's firing threshold (for ``tar.source: student-vth``).
        bn_momentum: Fast's ``bn_mmt`` (0: match raw batch statistics).
        measure_inactive: also measure zero-weight STARS terms, without gradient.
        precision: ``bf16`` runs the teacher and student forwards under autocast.
        compile: the BN statistics go through ``torch.compile``
            (:func:`~stars.synthesis.priors.compiled_batch_stats`; ``compile: true``).
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
        compile: bool = False,
    ) -> None:
        self.teacher = teacher
        # ``compile: true``: the BN statistics through inductor (compiled_batch_stats); off
        # while grad_norms measures (as the compiled teacher is, runtime.eager_forwards).
        self.compile = compile
        self._eager_stats = False
        self.weights = weights
        self.stars = stars
        self.student_vth = student_vth
        self.measure_inactive = measure_inactive
        # bf16 autocast for the teacher and student forwards; fp16 would need a grad scaler
        # per generator optimizer, so synthesis stays fp32 under ``precision: fp16``.
        self.precision = precision if precision == "bf16" else "fp32"
        self.bn_layers: list[nn.Module] = list(teacher.bn_layers())
        bn_prior = extract_bn_prior(self.bn_layers)
        tail_prior: TailPrior | None = None
        if stars.tar.site == "teacher":
            tail_prior = subset_prior(
                extract_tail_prior(bn_prior, stars.tar, student_vth=student_vth),
                stars.tar.layers,
            )
        self.bn = BNTerm(weights.bn, bn_prior, bn_momentum)
        self.rca = RCATerm(stars.rca)
        self.tar = TARTerm(stars.tar, tail_prior, student_vth)
        self.spike = SpikeTailTerm(stars.spike_tar, bn_prior)
        """Spike-aware TAR's maps and pairing (``stars.spike_tar``)."""
        w = weights
        functions = [
            FunctionTerm(name, weight)
            for name, weight in (
                ("act", w.act),
                ("ie", w.ie),
                ("tv_l1", w.tv_l1),
                ("tv_l2", w.tv_l2),
                ("l2", w.l2),
            )
            if weight
        ]
        self.terms: list[Term] = [
            self.bn,
            ClassTerm(w.oh, pseudo_labels=w.pseudo_labels),
            *functions,
            SpikeTARTerm(stars.spike_tar, self.spike),
            *([AdversarialTerm(w.adv)] if w.adv else []),
            *([DFADTerm(w.dfad)] if w.dfad else []),
            self.rca,
            self.tar,
        ]
        """Every term, in the order the total adds them (phases in order: teacher,
        student-tap, student, relation)."""
        self.scale = 1.0
        """``stars.schedule``'s factor on the STARS weights at the current epoch."""

    # The state the synthesizers, checkpoints and tests read, kept where it was.
    @property
    def bn_prior(self) -> BNPrior:
        return self.bn.prior

    @property
    def tail_prior(self) -> TailPrior | None:
        return self.tar.prior

    @property
    def bn_momentum(self) -> float:
        return self.bn.momentum

    @property
    def momentum_state(self) -> list[Stats] | None:
        return self.bn.momentum_state

    @momentum_state.setter
    def momentum_state(self, value: list[Stats] | None) -> None:
        self.bn.momentum_state = value

    @property
    def rca_weight(self) -> float:
        """lambda_rca in effect: ``stars.rca.weight``, or the calibrated value once
        ``stars.rca.grad_ratio`` has been applied (:attr:`rca_calibrated`)."""
        return self.rca.rca_weight

    @rca_weight.setter
    def rca_weight(self, value: float) -> None:
        self.rca.rca_weight = value

    @property
    def rca_calibrated(self) -> bool:
        return self.rca.calibrated

    @rca_calibrated.setter
    def rca_calibrated(self, value: bool) -> None:
        self.rca.calibrated = value

    @property
    def rca_age(self) -> int:
        """Generator steps since lambda_rca was last calibrated (``recalibrate_every``)."""
        return self.rca.age

    @rca_age.setter
    def rca_age(self, value: int) -> None:
        self.rca.age = value

    def to(self, device: torch.device) -> SynthesisObjective:
        """Move the priors and the terms' state to ``device``."""
        for term in self.terms:
            term.to(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Apply ``stars.schedule`` for 0-based ``epoch`` (a factor on every STARS weight)."""
        self.scale = self.stars.schedule.factor(epoch)

    @property
    def needs_student(self) -> bool:
        return any(term.needs_student() for term in self.terms)

    def update_momentum(self, stats: list[Stats]) -> None:
        """Fast: fold a finished batch's statistics into the running estimate."""
        self.bn.update(stats)

    def state_dict(self) -> dict[str, Any]:
        """Every term's state (Fast's momentum statistics, RCA's calibrated weight)."""
        state: dict[str, Any] = {}
        for term in self.terms:
            state |= term.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for term in self.terms:
            term.load_state_dict(state)

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        student: SpikingStudent | None,
        *,
        student_active: bool = True,
        grad_inactive: bool = False,
        calibrate: bool = True,
        measure: bool = True,
    ) -> ObjectiveOutput:
        """``L_G`` for images ``x [N, C, H, W]`` and labels ``y [N]``.

        ``student`` is run (frozen by the caller) only when a term needs it and
        ``student_active`` (Fast turns the adversarial terms off during warm-up).
        ``grad_inactive`` keeps the graph of zero-weight STARS terms (for :meth:`grad_norms`).
        ``calibrate``: this call may calibrate lambda_rca (``stars.rca.grad_ratio``); a
        measurement (:meth:`grad_norms`) does not.
        ``measure``: this call measures the zero-weight terms (with ``measure_inactive``).
        The synthesizers pass it on their last step only, the one whose terms they report
        (:meth:`SynthesisContext.finish`): a measurement draws no random numbers and adds
        nothing to the loss, so the other steps are the same without it, bit for bit.
        """
        with FeatureTap(self.bn_layers) as tap, autocast(x.device, self.precision):
            t_feats, t_logits = self.teacher.forward_features(x)
            acts = [tap[m] for m in self.bn_layers]
        stats_of = compiled_batch_stats if self.compile and not self._eager_stats else batch_stats
        b = TermBatch(
            x=x,
            y=y,
            t_feats=t_feats,
            t_logits=t_logits,
            acts=acts,
            stats=[stats_of(a) for a in acts],
            scale=self.scale,
            grad_inactive=grad_inactive,
        )
        terms: dict[str, Tensor] = {}
        active: dict[str, float] = {}
        measure = self.measure_inactive and measure

        def run(phase: str) -> None:
            for term in self.terms:
                if term.phase != phase:
                    continue
                values = term.compute(b, measure)
                terms.update(values)
                weight = term.weight(b.scale)
                if term.name in values and weight != 0.0:
                    active[term.name] = weight

        run("teacher")
        if student is not None and student_active and self.needs_student:
            s_bns = [m for term in self.terms for m in term.student_bn_layers(student)]
            listed = getattr(student, "spiking_neurons", None)
            wanted = any(
                t.wants_neurons(self.scale, measure and callable(listed)) for t in self.terms
            )
            if wanted:
                if not callable(listed):
                    raise TypeError("stars.spike_tar needs a student with spiking_neurons()")
                b.neurons = [m for _, m in listed()]
            with (
                FeatureTap(s_bns) as s_tap,
                MembraneTap(self.spike.tapped(b.neurons) if b.neurons else []) as m_tap,
                autocast(x.device, self.precision),
            ):
                s_feats_seq, s_logits_seq = student.forward_features(x)
                b.student = student
                b.s_acts = [s_tap[m] for m in s_bns]
                b.s_feats, b.s_logits = L.time_mean(s_feats_seq), L.time_mean(s_logits_seq)
                b.membranes = m_tap
                run("student-tap")
            b.membranes = None
            run("student")
        run("relation")

        if calibrate and self.stars.rca.grad_ratio is not None:
            if rca_calibration_due(self, terms, x):
                active["rca"] = (
                    self.rca.calibrate(terms["bn"], terms["rca"], x, self.weights.bn) * self.scale
                )
            elif self.rca_calibrated and x.requires_grad:
                self.rca.age += 1
        if self.stars.rca.grad_ratio is not None:
            terms["rca_weight"] = torch.tensor(self.rca_weight)
        total = torch.zeros((), device=x.device)
        for name, weight in active.items():
            total = total + weight * terms[name]
        return ObjectiveOutput(total, terms, t_logits, b.stats)

    def grad_norms(
        self, x: Tensor, y: Tensor, student: SpikingStudent | None
    ) -> Mapping[str, float]:
        """The norm of each term's gradient on ``x`` (weighted as in ``L_G``, STARS terms at
        weight 1 when off). Logged at the start of synthesis to calibrate the STARS weights
        against the BN term."""
        x = x.detach().requires_grad_(True)
        self._eager_stats = True
        try:
            with eager_forwards(self.teacher, student):
                if student is not None:
                    with frozen(student):
                        out = self(x, y, student, grad_inactive=True, calibrate=False)
                else:
                    out = self(x, y, student, grad_inactive=True, calibrate=False)
        finally:
            self._eager_stats = False
        norms: dict[str, float] = {}
        for term in self.terms:
            weight = term.grad_weight()
            value = out.terms.get(term.name)
            if value is None or not value.requires_grad or weight == 0:
                continue
            (g,) = torch.autograd.grad(value * weight, x, retain_graph=True, allow_unused=True)
            norms[term.name] = 0.0 if g is None else float(g.norm())
        return norms
