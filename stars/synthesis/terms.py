"""The terms of the generator objective as objects (docs/design.md sections 4.1 to 4.6).

Each term owns its weight (with ``stars.schedule``'s factor where it is a STARS term), its
state (Fast's momentum statistics, RCA's calibrated weight) and what it needs of the
student (a BN tap, the spiking neurons). :class:`~stars.synthesis.objective.
SynthesisObjective` runs the teacher once and the student at most once, then iterates its
terms in order; each returns its values by name and the objective adds the active ones to
``L_G`` in that order.

A term is computed in one of four phases, in this order:

- ``teacher``: from the teacher's forward alone (BN matching, the class term, DAFL's and
  DeepInversion's terms);
- ``student-tap``: while the student's taps are open (spike-aware TAR reads the membrane
  potentials there);
- ``student``: from the student's time-averaged outputs (Fast's and DFAD's adversarial
  terms);
- ``relation``: after both (RCA, TAR).

Adding a term is a subclass of :class:`Term` and one entry in the objective's list.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from stars.config import RCAConfig, SpikeTARConfig, TARConfig
from stars.models.protocols import SpikingStudent
from stars.neurons.membrane import MembraneTap
from stars.synthesis import losses as L
from stars.synthesis.priors import BNPrior, TailPrior, extract_bn_prior, extract_tail_prior
from stars.synthesis.spike_tar import SpikeTailTerm

__all__ = [
    "AdversarialTerm",
    "BNTerm",
    "ClassTerm",
    "DFADTerm",
    "FunctionTerm",
    "Phase",
    "RCATerm",
    "SpikeTARTerm",
    "TARTerm",
    "Term",
    "TermBatch",
    "layer_indices",
    "subset_prior",
]

Stats = tuple[Tensor, Tensor]
Phase = Literal["teacher", "student-tap", "student", "relation"]


def layer_indices(chosen: tuple[int, ...], n: int) -> list[int]:
    """Layer indices (negative from the end) as non-negative ones; out of range is an error."""
    out = [i + n if i < 0 else i for i in chosen]
    bad = [c for c, i in zip(chosen, out, strict=True) if not 0 <= i < n]
    if bad:
        raise ValueError(f"stars.tar.layers {bad} out of range for {n} BN layers")
    return out


def subset_prior(prior: TailPrior, chosen: tuple[int, ...] | None) -> TailPrior:
    """``prior`` restricted to the ``chosen`` layers (None: all)."""
    if chosen is None:
        return prior
    idx = layer_indices(chosen, len(prior.layers))
    return TailPrior(tuple(prior.layers[i] for i in idx), prior.source, prior.levels)


@dataclass
class TermBatch:
    """What the terms see of one evaluation of the objective.

    Attributes:
        x, y: the images ``[N, C, H, W]`` and their labels ``[N]``.
        t_feats, t_logits: the teacher's penultimate features and logits.
        acts: the inputs of the teacher's BN layers, in forward order; ``stats`` their batch
            statistics.
        scale: ``stars.schedule``'s factor at the current epoch.
        grad_inactive: keep the graph of zero-weight terms (gradient measurements).
        student: the student when it takes part (frozen by the caller), else None.
        s_feats, s_logits: its time-averaged features and logits (None without a student).
        s_acts: the inputs of the student BN layers a term asked for.
        membranes: the open membrane tap (``student-tap`` phase only).
        neurons: the spiking neurons a term asked for, in forward order.
    """

    x: Tensor
    y: Tensor
    t_feats: Tensor
    t_logits: Tensor
    acts: list[Tensor]
    stats: list[Stats]
    scale: float = 1.0
    grad_inactive: bool = False
    student: SpikingStudent | None = None
    s_feats: Tensor | None = None
    s_logits: Tensor | None = None
    s_acts: list[Tensor] = field(default_factory=list)
    membranes: MembraneTap | None = None
    neurons: list[nn.Module] = field(default_factory=list)

    def grad_for(self, weight: float) -> bool:
        """Whether a term of ``weight`` builds a graph (on, or measured for its gradient)."""
        return (weight > 0 or self.grad_inactive) and torch.is_grad_enabled()


class Term(ABC):
    """One term of ``L_G``.

    Subclasses set :attr:`name` and :attr:`phase` and implement :meth:`compute`; a term
    with state overrides :meth:`state_dict`, :meth:`load_state_dict` and :meth:`to`.
    """

    name: str
    """The term's key in ``ObjectiveOutput.terms`` and the logs."""
    phase: ClassVar[Phase] = "teacher"

    def weight(self, scale: float) -> float:
        """The weight in ``L_G`` now (``scale``: the schedule's factor; 0: off)."""
        del scale
        return 0.0

    def grad_weight(self) -> float:
        """The weight its gradient is measured at (``grad_norms``; 0: not measured)."""
        return 0.0

    def needs_student(self) -> bool:
        """The student must be run for this term."""
        return False

    def student_bn_layers(self, student: SpikingStudent) -> list[nn.Module]:
        """Student BN layers whose inputs this term reads (``TermBatch.s_acts``)."""
        del student
        return []

    def wants_neurons(self, scale: float, measure_inactive: bool) -> bool:
        """This term reads the student's membrane potentials (``student-tap`` phase)."""
        del scale, measure_inactive
        return False

    @abstractmethod
    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        """The term's values by name (its own name first; diagnostics after). Empty: not
        computed for this batch."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state

    def to(self, device: torch.device) -> None:
        del device


class BNTerm(Term):
    """``L_bn``: the batch statistics of the teacher's BN inputs (or Fast's momentum
    estimate of them) against the running statistics (section 4.1)."""

    name = "bn"

    def __init__(self, weight: float, prior: BNPrior, momentum: float) -> None:
        self._weight = weight
        self.prior = prior
        self.momentum = momentum
        self.momentum_state: list[Stats] | None = None
        self.device = torch.device("cpu")

    def weight(self, scale: float) -> float:
        return self._weight

    def grad_weight(self) -> float:
        return self._weight

    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        return {
            "bn": L.bn_matching(
                b.stats, self.prior, previous=self.momentum_state, momentum=self.momentum
            )
        }

    def update(self, stats: list[Stats]) -> None:
        """Fast: fold a finished batch's statistics into the running estimate."""
        if self.momentum <= 0:
            return
        detached = [(m.detach(), v.detach()) for m, v in stats]
        self.momentum_state = L.momentum_stats(
            detached, self.momentum_state, momentum=self.momentum
        )

    def state_dict(self) -> dict[str, Any]:
        if self.momentum_state is None:
            return {}
        return {"bn_momentum": [(m.cpu(), v.cpu()) for m, v in self.momentum_state]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mmt = state.get("bn_momentum")
        self.momentum_state = (
            None if mmt is None else [(m.to(self.device), v.to(self.device)) for m, v in mmt]
        )

    def to(self, device: torch.device) -> None:
        self.device = device
        self.prior = self.prior.to(device)
        if self.momentum_state is not None:
            self.momentum_state = [(m.to(device), v.to(device)) for m, v in self.momentum_state]


class ClassTerm(Term):
    """``L_oh``: the teacher's cross-entropy on the sampled labels, or on its own argmax
    (DAFL's pseudo-labels)."""

    name = "oh"

    def __init__(self, weight: float, *, pseudo_labels: bool) -> None:
        self._weight = weight
        self.pseudo_labels = pseudo_labels

    def weight(self, scale: float) -> float:
        return self._weight

    def grad_weight(self) -> float:
        return self._weight

    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        targets = b.t_logits.argmax(1).detach() if self.pseudo_labels else b.y
        return {"oh": L.class_cross_entropy(b.t_logits, targets)}


class FunctionTerm(Term):
    """A baseline's own teacher-side term: a pure function of the batch (DAFL's activation
    and information entropy, DeepInversion's total variation and image L2)."""

    def __init__(self, name: str, weight: float) -> None:
        self.name = name
        self._weight = weight

    def weight(self, scale: float) -> float:
        return self._weight

    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        if self.name == "act":
            value = L.dafl_activation(b.t_feats)
        elif self.name == "ie":
            value = L.dafl_information_entropy(b.t_logits)
        elif self.name == "tv_l1":
            value = L.total_variation(b.x, p=1)
        elif self.name == "tv_l2":
            value = L.total_variation(b.x, p=2)
        elif self.name == "l2":
            value = L.image_l2(b.x)
        else:
            raise ValueError(f"unknown function term {self.name!r}")
        return {self.name: value}


class SpikeTARTerm(Term):
    """Spike-aware TAR (section 4.6): the student's soft threshold crossings at its spiking
    layers against the teacher's tail exceedances at the paired BN layers; the generator
    maximizes the mismatch (``adversarial``, gated to agreed samples) or minimizes it."""

    name = "spike_tar"
    phase = "student-tap"

    def __init__(self, cfg: SpikeTARConfig, spike: SpikeTailTerm) -> None:
        self.cfg = cfg
        self.spike = spike

    def weight(self, scale: float) -> float:
        return self.cfg.weight * scale

    def grad_weight(self) -> float:
        return self.cfg.weight or 1.0

    def needs_student(self) -> bool:
        return self.cfg.weight > 0

    def wants_neurons(self, scale: float, measure_inactive: bool) -> bool:
        return self.weight(scale) > 0 or measure_inactive

    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        if not b.neurons or b.membranes is None or b.s_logits is None:
            return {}
        w = self.weight(b.scale)
        with torch.set_grad_enabled(b.grad_for(w)):
            adversarial = self.cfg.role == "adversarial"
            gate = (
                L.agreement_mask(b.t_logits, b.s_logits).float()
                if adversarial and self.cfg.gate
                else None
            )
            value = self.spike.loss(dict(enumerate(b.acts)), b.membranes, b.neurons, gate=gate)
        return {"spike_tar": -value if adversarial else value}

    def to(self, device: torch.device) -> None:
        self.spike.to(device)


class AdversarialTerm(Term):
    """Fast's and CMI's adversarial masked KL (the generator maximizes the disagreement on
    the samples the student still classifies like the teacher)."""

    name = "adv"
    phase = "student"

    def __init__(self, weight: float) -> None:
        self._weight = weight

    def weight(self, scale: float) -> float:
        return self._weight

    def grad_weight(self) -> float:
        return self._weight

    def needs_student(self) -> bool:
        return self._weight > 0

    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        if b.s_logits is None:
            return {}
        return {"adv": L.adversarial_masked_kl(b.t_logits, b.s_logits)}


class DFADTerm(Term):
    """DFAD: the generator maximizes ``mean |t - s|`` (``-dfad`` is minimized)."""

    name = "dfad"
    phase = "student"

    def __init__(self, weight: float) -> None:
        self._weight = weight

    def weight(self, scale: float) -> float:
        return self._weight

    def needs_student(self) -> bool:
        return self._weight > 0

    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        if b.s_logits is None:
            return {}
        return {"dfad": -L.dfad_l1(b.t_logits, b.s_logits)}


class RCATerm(Term):
    """RCA (section 4.2): the teacher's and the student's cross-sample relations, aligned or
    (``adversarial``) opposed. Owns lambda_rca: ``weight``, or the value calibrated from
    ``grad_ratio`` (kept, checkpointed, re-measured every ``recalibrate_every`` steps)."""

    name = "rca"
    phase = "relation"

    def __init__(self, cfg: RCAConfig) -> None:
        self.cfg = cfg
        self.rca_weight: float = cfg.weight
        self.calibrated = False
        self.age = 0
        """Generator steps since lambda_rca was last calibrated (``recalibrate_every``)."""

    def weight(self, scale: float) -> float:
        return self.rca_weight * scale

    def grad_weight(self) -> float:
        return self.rca_weight or 1.0

    def needs_student(self) -> bool:
        return self.cfg.weight > 0

    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        if b.s_feats is None or b.s_logits is None:
            return {}
        use_logits = self.cfg.features == "logits"
        z_t = b.t_logits if use_logits else b.t_feats
        z_s = b.s_logits if use_logits else b.s_feats
        w = self.weight(b.scale)
        if not (w > 0 or measure_inactive):
            return {}
        with torch.set_grad_enabled(b.grad_for(w)):
            if self.cfg.role == "adversarial":
                rca = L.rca_adversarial(z_t, z_s, b.t_logits, b.s_logits, delta=self.cfg.delta)
            else:
                rca = L.rca_loss(z_t, z_s, delta=self.cfg.delta)
        return {"rca": rca}

    def calibration_due(self, terms: Mapping[str, Tensor], x: Tensor, bn_weight: float) -> bool:
        """Whether this step calibrates lambda_rca: asked for, not done yet (or
        ``recalibrate_every`` steps since the last time), RCA on and measured with a graph to
        the images (not under ``no_grad``)."""
        rca = terms.get("rca")
        every = self.cfg.recalibrate_every
        return (
            (not self.calibrated or (every is not None and self.age >= every))
            and self.cfg.weight > 0
            and rca is not None
            and rca.requires_grad
            and terms["bn"].requires_grad
            and x.requires_grad
            and bn_weight > 0
        )

    def calibrate(self, bn: Tensor, rca: Tensor, x: Tensor, bn_weight: float) -> float:
        """Set lambda_rca so that ``|d(w rca)/dx| = grad_ratio * |d(l_bn bn)/dx|``.

        Left uncalibrated (retried at the next step) while RCA has no gradient yet: fewer
        than two samples on which teacher and student agree."""
        ratio = self.cfg.grad_ratio
        assert ratio is not None
        (g_bn,) = torch.autograd.grad(bn * bn_weight, x, retain_graph=True, allow_unused=True)
        (g_rca,) = torch.autograd.grad(rca, x, retain_graph=True, allow_unused=True)
        n_bn = 0.0 if g_bn is None else float(g_bn.norm())
        n_rca = 0.0 if g_rca is None else float(g_rca.norm())
        if n_rca > 0 and n_bn > 0 and math.isfinite(n_bn / n_rca):
            self.rca_weight = ratio * n_bn / n_rca
            self.calibrated = True
            self.age = 1
        return self.rca_weight

    def state_dict(self) -> dict[str, Any]:
        if not self.calibrated:
            return {}
        return {"rca_weight": self.rca_weight, "rca_age": self.age}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "rca_weight" in state:
            self.rca_weight = float(state["rca_weight"])
            self.calibrated = True
            self.age = int(state.get("rca_age", 0))


class TARTerm(Term):
    """TAR (section 4.3): soft exceedances of BN inputs over prior thresholds against the
    prior's tail masses, at the teacher's BN layers or the student's; also reports the
    share of saturated sigmoids (``tar_saturated``)."""

    name = "tar"
    phase = "relation"

    def __init__(self, cfg: TARConfig, prior: TailPrior | None, student_vth: float | None):
        self.cfg = cfg
        self.prior = prior
        self.student_vth = student_vth

    def weight(self, scale: float) -> float:
        return self.cfg.weight * scale

    def grad_weight(self) -> float:
        return self.cfg.weight or 1.0

    def needs_student(self) -> bool:
        return self.cfg.site == "student"

    def student_bn_layers(self, student: SpikingStudent) -> list[nn.Module]:
        if self.cfg.site != "student":
            return []
        s_bns = list(student.bn_layers())
        if self.cfg.layers is not None:
            s_bns = [s_bns[i] for i in layer_indices(self.cfg.layers, len(s_bns))]
        return s_bns

    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        w = self.weight(b.scale)
        if not (w > 0 or measure_inactive):
            return {}
        prior, feats = self.prior, b.acts
        if self.cfg.layers is not None:
            feats = [b.acts[i] for i in layer_indices(self.cfg.layers, len(b.acts))]
        if self.cfg.site == "student":
            prior, feats = None, b.s_acts
            if b.student is not None and b.s_acts:
                s_prior = extract_bn_prior(b.student.bn_layers())
                prior = subset_prior(
                    extract_tail_prior(
                        s_prior.to(b.x.device), self.cfg, student_vth=self.student_vth
                    ),
                    self.cfg.layers,
                )
        if prior is None:
            return {}
        with torch.set_grad_enabled(b.grad_for(w)):
            tar, exceed = L.tar_loss_with_exceedances(feats, prior)
        # Saturation check: the share of (layer, kappa, channel) whose soft exceedance is ~0
        # or ~1, i.e. whose sigmoids give (almost) no gradient to the images.
        with torch.no_grad():
            flat = torch.cat([e.detach().flatten() for e in exceed])
            stuck = (flat < 1e-4) | (flat > 1 - 1e-4)
        return {"tar": tar, "tar_saturated": stuck.float().mean()}

    def to(self, device: torch.device) -> None:
        if self.prior is not None:
            self.prior = self.prior.to(device)
