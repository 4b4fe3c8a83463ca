"""The generator objective as a list of term objects (stars.synthesis.terms)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from stars.config import RCAConfig, StarsConfig, TARConfig
from stars.synthesis.objective import SynthesisObjective
from stars.synthesis.terms import Term, TermBatch
from stars.synthesis.weights import TermWeights
from synthesis.test_synthesizers import SIZE, STARS_ON, K, tiny_student, tiny_teacher


def _objective(stars: StarsConfig = STARS_ON, adv: float = 1.1) -> SynthesisObjective:
    w = TermWeights(bn=10.0, oh=0.4, adv=adv)
    return SynthesisObjective(tiny_teacher(), weights=w, stars=stars, student_vth=1.0)


def _batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, SIZE, SIZE, generator=g).requires_grad_(True)
    return x, torch.randint(0, K, (6,), generator=g)


def test_total_is_the_weighted_sum_of_the_active_terms_in_list_order() -> None:
    obj = _objective()
    x, y = _batch()
    out = obj(x, y, tiny_student(), calibrate=False)
    expected = torch.zeros(())
    added = []
    for term in obj.terms:
        value = out.terms.get(term.name)
        weight = term.weight(obj.scale)
        if value is not None and weight != 0:
            expected = expected + weight * value
            added.append(term.name)
    # Same additions in the same order: bit for bit, no tolerance needed.
    assert torch.equal(out.total, expected)
    assert added == ["bn", "oh", "spike_tar", "adv", "rca", "tar"]


class _Brightness(Term):
    """A term added from outside: the mean image value (a made-up prior)."""

    name = "brightness"

    def weight(self, scale: float) -> float:
        return 0.5

    def compute(self, b: TermBatch, measure_inactive: bool) -> dict[str, Tensor]:
        return {"brightness": b.x.mean()}


def test_a_new_term_is_one_class_and_one_list_entry() -> None:
    obj = _objective(StarsConfig())
    x, y = _batch()
    before = obj(x, y, None).total
    obj.terms.append(_Brightness())
    out = obj(x, y, None)
    assert float(out.terms["brightness"].detach()) == pytest.approx(float(x.detach().mean()))
    # One more addition of 0.5 * mean(x) in fp32: exact up to one rounding of the sum.
    expected = float((before + 0.5 * x.mean()).detach())
    assert float(out.total.detach()) == pytest.approx(expected, rel=1e-6)
    (g,) = torch.autograd.grad(out.total - before, x)
    assert torch.allclose(g, torch.full_like(x, 0.5 / x.numel()), rtol=1e-5)


def test_only_student_terms_make_the_student_run() -> None:
    teacher_only = _objective(StarsConfig(), adv=0.0)
    assert not teacher_only.needs_student
    with_rca = _objective(StarsConfig(rca=RCAConfig(weight=0.1)), adv=0.0)
    assert with_rca.needs_student
    student_site = _objective(StarsConfig(tar=TARConfig(site="student")), adv=0.0)
    assert student_site.needs_student


def test_terms_own_their_state_and_the_objective_collects_it() -> None:
    stars = StarsConfig(rca=RCAConfig(weight=0.1, role="align", grad_ratio=0.5))
    obj = _objective(stars)
    obj.bn.momentum = 0.9
    x, y = _batch()
    student = tiny_student()
    out = obj(x, y, student)
    obj.update_momentum(out.stats)
    state = obj.state_dict()
    assert set(state) >= {"bn_momentum"}
    assert ("rca_weight" in state) == obj.rca.calibrated
    fresh = _objective(stars)
    fresh.load_state_dict(state)
    assert fresh.rca.calibrated == obj.rca.calibrated
    assert fresh.rca.rca_weight == obj.rca.rca_weight
    assert fresh.momentum_state is not None and obj.momentum_state is not None
    for (m1, v1), (m2, v2) in zip(fresh.momentum_state, obj.momentum_state, strict=True):
        assert torch.equal(m1, m2) and torch.equal(v1, v2)


def test_grad_norms_measure_each_term_at_its_grad_weight() -> None:
    obj = _objective()
    x, y = _batch()
    norms = obj.grad_norms(x, y, tiny_student())
    assert set(norms) == {"bn", "oh", "adv", "rca", "tar", "spike_tar"}
    x2 = x.detach().requires_grad_(True)
    out = obj(x2, y, None, grad_inactive=True, calibrate=False)
    (g,) = torch.autograd.grad(out.terms["bn"] * obj.bn.grad_weight(), x2)
    # Same graph, same reduction order: equal to fp32 rounding of one norm.
    assert norms["bn"] == pytest.approx(float(g.norm()), rel=1e-6)
