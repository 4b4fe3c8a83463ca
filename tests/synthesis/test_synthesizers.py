"""Synthesizers on a tiny teacher / student: each baseline with and without STARS."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from pydantic import TypeAdapter
from torch import nn

from stars.config import (
    DAFLSynthesis,
    DeepInversionSynthesis,
    DFADSynthesis,
    FastSynthesis,
    NeuronConfig,
    RCAConfig,
    SpikeTARConfig,
    StarsConfig,
    StudentConfig,
    SynthesisConfig,
    TARConfig,
    WeightSchedule,
)
from stars.models.factory import freeze
from stars.models.protocols import Network, SpikingStudent, Teacher
from stars.models.students import build_student
from stars.models.teachers import CifarResNet
from stars.synthesis.factory import build_synthesizer
from stars.synthesis.methods import KINDS as REGISTERED
from stars.synthesis.methods import METHODS
from stars.synthesis.objective import SynthesisObjective, frozen
from stars.synthesis.synthesizers import SynthesizerBase

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
SIZE, K = 16, 4


def tiny_teacher() -> CifarResNet:
    """A ResNet-8 whose BN running statistics come from a few random batches."""
    return copy.deepcopy(_teacher())


@functools.cache
def _teacher() -> CifarResNet:
    torch.manual_seed(0)
    t = CifarResNet(8, num_classes=K, image_size=SIZE)
    t.train()
    with torch.no_grad():
        for _ in range(3):
            t(torch.randn(8, 3, SIZE, SIZE) * 1.5 + 0.3)
    return freeze(t)


def tiny_student() -> SpikingStudent:
    torch.manual_seed(1)
    return build_student(
        StudentConfig(arch="spiking_tiny", T=2, neuron=NeuronConfig()),
        num_classes=K,
        image_size=SIZE,
    )


CASES: dict[str, SynthesisConfig] = {
    "deepinversion": DeepInversionSynthesis(batch_size=6, iterations=4, lr=0.05, memory_size=64),
    "dafl": DAFLSynthesis(batch_size=6, nz=16, g_steps=4, memory_size=64, lr_g=0.01),
    "dfad": DFADSynthesis(batch_size=6, nz=16, g_steps=4, memory_size=64, lr_g=0.01),
    "fast": FastSynthesis(
        batch_size=6, nz=16, g_steps=4, memory_size=64, warmup_epochs=0, lr_g=0.01
    ),
}
STARS_ON = StarsConfig(
    rca=RCAConfig(weight=1.0, role="align"),
    tar=TARConfig(weight=5.0, kappas=(1.0, 2.0)),
    spike_tar=SpikeTARConfig(weight=1.0, role="align"),
)
# STARS configured differently but switched off: must be exactly the baseline.
STARS_OFF_OTHER = StarsConfig(
    rca=RCAConfig(weight=0.0, role="align", features="logits", delta=1e-2),
    tar=TARConfig(weight=0.0, kappas=(1.5,), source="laplace-bn", tau_rel=0.3, layers=(-1,)),
    spike_tar=SpikeTARConfig(
        weight=0.0, student_weight=0.0, granularity="sample", tau_rel=0.5, stages=(-1,)
    ),
    schedule=WeightSchedule(kind="cosine", end_epoch=3),
)


def build(
    cfg: SynthesisConfig,
    stars: StarsConfig,
    seed: int = 0,
    teacher: Teacher | None = None,
    student_vth: float | None = None,
) -> SynthesizerBase:
    return build_synthesizer(
        cfg,
        stars,
        teacher=teacher if teacher is not None else tiny_teacher(),
        num_classes=K,
        image_size=SIZE,
        mean=MEAN,
        std=STD,
        device=torch.device("cpu"),
        seed=seed,
        student_vth=student_vth,
    )


def make(
    kind: str, stars: StarsConfig = StarsConfig(), seed: int = 0, teacher: Teacher | None = None
) -> SynthesizerBase:
    return build(tiny_case(kind), stars, seed, teacher, student_vth=1.0)


def snapshot(m: Network) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def hook_count(m: Network) -> int:
    return sum(
        len(x._forward_hooks) + len(x._forward_pre_hooks) + len(x._backward_hooks)
        for x in m.modules()
    )


def tiny_case(kind: str) -> SynthesisConfig:
    """The tiny config of a registered kind: :data:`CASES`'s, or, for a method registered
    without an entry there, its defaults at this file's sizes (batch 6, 4 steps per batch, a
    16-d latent, no warm-up)."""
    if kind in CASES:
        return CASES[kind]
    method = METHODS[kind]
    fields = method.model_fields
    update: dict[str, Any] = {"batch_size": 6, "memory_size": 64}
    if method.steps_field is not None:
        update[method.steps_field] = 4
    update |= {k: v for k, v in (("nz", 16), ("warmup_epochs", 0)) if k in fields}
    return TypeAdapter(SynthesisConfig).validate_python({"kind": kind, **update})


KINDS = list(REGISTERED)


def test_every_registered_kind_is_covered() -> None:
    assert set(CASES) <= set(KINDS)
    for kind in KINDS:
        assert tiny_case(kind).kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_step_shapes_finite_bank_and_models_untouched(kind: str) -> None:
    teacher = tiny_teacher()
    student = tiny_student()
    student.train()
    t0, s0 = snapshot(teacher), snapshot(student)
    synth = make(kind, STARS_ON, teacher=teacher)
    global_rng = torch.get_rng_state()
    step = synth.synthesize(student)
    assert torch.equal(torch.get_rng_state(), global_rng), "draws only from its own RNG"
    assert step.images.shape == (6, 3, SIZE, SIZE)
    assert torch.isfinite(step.images).all()
    assert step.labels.shape == (6,)
    assert set(step.losses) >= {"bn", "oh", "total", "tar", "rca"}
    if kind != "deepinversion" or STARS_ON.spike_tar.weight > 0:
        assert "spike_tar" in step.losses
    assert all(torch.isfinite(torch.tensor(v)) for v in step.losses.values())
    assert len(step.trace) == 4
    drawn = synth.sample(5)
    assert drawn.shape == (5, 3, SIZE, SIZE)
    assert_untouched(teacher, t0, student, s0)


def assert_untouched(
    teacher: Teacher,
    t0: dict[str, torch.Tensor],
    student: SpikingStudent,
    s0: dict[str, torch.Tensor],
) -> None:
    """Teacher and student as they were (state ``t0`` / ``s0``) after synthesis: the same
    weights and buffers, no gradients left, the student back in train mode with its
    parameters trainable, every hook removed."""
    model: Network
    for before, model in ((t0, teacher), (s0, student)):
        after = snapshot(model)
        assert after.keys() == before.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), k
        assert all(p.grad is None for p in model.parameters())
        assert hook_count(model) == 0
    assert student.training, "the student's mode must be restored"
    assert all(p.requires_grad for p in student.parameters())
    assert not teacher.training


@pytest.mark.parametrize("kind", KINDS)
def test_objective_decreases(kind: str) -> None:
    synth = make(kind)
    student = tiny_student()
    traces = [synth.synthesize(student).trace for _ in range(2)]
    first, last = traces[0][0], traces[-1][-1]
    assert last < first, traces


@pytest.mark.parametrize("kind", KINDS)
def test_stars_off_is_the_baseline_bit_for_bit(kind: str) -> None:
    student = tiny_student()
    base = make(kind, StarsConfig())
    off = make(kind, STARS_OFF_OTHER)
    on = make(kind, STARS_ON)
    a = [base.synthesize(student).images for _ in range(2)]
    b = [off.synthesize(student).images for _ in range(2)]
    c = [on.synthesize(student).images for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_measuring_only_the_last_step_changes_nothing(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zero-weight terms are measured on a call's last step only (the step whose terms it
    reports): the images, the trace and every reported loss are those of measuring them at
    every step, bit for bit, for the baseline and for STARS on; and the other steps do skip."""
    student = tiny_student()
    calls: list[bool] = []
    call = SynthesisObjective.__call__

    def always(self: SynthesisObjective, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("measure", True))
        kwargs["measure"] = True
        return call(self, *args, **kwargs)

    for stars in (STARS_OFF_OTHER, STARS_ON):
        lean = make(kind, stars)
        every = make(kind, stars)
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(SynthesisObjective, "__call__", always)
            want = [every.synthesize(student) for _ in range(2)]
        got = [lean.synthesize(student) for _ in range(2)]
        assert calls.count(False) >= 2 and calls.count(True) == 2, calls
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.images, b.images)
            assert a.trace == b.trace
            assert a.losses == b.losses
            assert "tar" in a.losses  # measured, when inactive too


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_runs_repeat_and_seeds_differ(kind: str) -> None:
    student = tiny_student()
    a = make(kind, STARS_ON, seed=3).synthesize(student)
    b = make(kind, STARS_ON, seed=3).synthesize(student)
    c = make(kind, STARS_ON, seed=4).synthesize(student)
    assert torch.equal(a.images, b.images)
    assert a.losses == b.losses
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_resume_continues_identically(kind: str) -> None:
    student = tiny_student()
    ref = make(kind, STARS_ON)
    ref.synthesize(student)
    state: dict[str, Any] = copy.deepcopy(ref.state_dict())
    expected = ref.synthesize(student).images
    resumed = make(kind, STARS_ON, seed=99)  # a different seed: the state must override it
    resumed.load_state_dict(state)
    assert torch.equal(resumed.synthesize(student).images, expected)
    assert len(resumed.ctx.bank) == len(ref.ctx.bank)


def test_fast_warmup_keeps_student_out() -> None:
    cfg = FastSynthesis(batch_size=6, nz=16, g_steps=2, warmup_epochs=5, memory_size=64)
    synth = build(cfg, StarsConfig())
    student = tiny_student()
    calls = []
    first_bn = student.bn_layers()[0]
    first_bn.register_forward_hook(lambda *a: calls.append(1))
    synth.synthesize(student)
    assert not calls and "adv" not in synth.synthesize(student).losses
    synth.ctx.epoch = 5
    assert "adv" in synth.synthesize(student).losses
    assert calls


def test_grad_norms_reach_images_for_every_active_term() -> None:
    synth = make("fast", STARS_ON)
    x = torch.randn(6, 3, SIZE, SIZE)
    y = torch.arange(6) % K
    norms = synth.ctx.objective.grad_norms(x, y, tiny_student())
    for name in ("bn", "oh", "tar", "rca", "spike_tar"):
        assert name in norms
        assert norms[name] > 0, norms


def test_tar_saturation_is_reported() -> None:
    synth = make("fast", STARS_ON)
    student = tiny_student()
    step = synth.synthesize(student)
    assert 0.0 <= step.losses["tar_saturated"] <= 1.0
    # A flat batch gives each channel one value, on one side of each threshold: most
    # exceedances are exactly 0 or 1, and their sigmoids pass no gradient.
    obj = synth.ctx.objective
    flat = torch.zeros(6, 3, SIZE, SIZE)
    out = obj(flat, torch.zeros(6, dtype=torch.long), None)
    assert float(out.terms["tar_saturated"]) > 0.5
    varied = torch.randn(6, 3, SIZE, SIZE) * 100
    assert float(obj(varied, torch.zeros(6, dtype=torch.long), None).terms["tar_saturated"]) < 0.1


@pytest.mark.parametrize("role", ["align", "adversarial"])
def test_rca_grad_ratio_calibrates_the_weight_once(role: str) -> None:
    stars = StarsConfig(rca=RCAConfig(weight=1.0, role=role, grad_ratio=0.25))
    synth = make("fast", stars)
    obj = synth.ctx.objective
    student = tiny_student()
    y = torch.arange(6) % K
    # A measurement never calibrates.
    obj.grad_norms(torch.randn(6, 3, SIZE, SIZE), y, student)
    assert not obj.rca_calibrated and obj.rca_weight == 1.0
    if role == "adversarial":  # gated to agreed samples: make the student agree everywhere
        student = _Echo(obj.teacher)
    x = (torch.randn(6, 3, SIZE, SIZE) * 0.5).requires_grad_(True)
    with frozen(student):
        out = obj(x, y, student)
    assert obj.rca_calibrated and obj.rca_weight != 1.0
    w = obj.rca_weight
    assert float(out.terms["rca_weight"]) == pytest.approx(w)
    # On the calibration batch RCA's weighted gradient is 0.25x the BN term's ...
    with frozen(student):
        norms = obj.grad_norms(x.detach(), y, student)
    assert norms["rca"] / norms["bn"] == pytest.approx(0.25, rel=1e-3)
    # ... the total uses the calibrated weight ...
    t, wt = {k: float(v.detach()) for k, v in out.terms.items()}, obj.weights
    expected = wt.bn * t["bn"] + wt.oh * t["oh"] + w * t["rca"] + wt.adv * t["adv"]
    assert float(out.total.detach()) == pytest.approx(expected, rel=1e-5)
    # ... it is set once, and a checkpoint carries it.
    with frozen(student):
        obj((torch.randn(6, 3, SIZE, SIZE) * 3).requires_grad_(True), y, student)
    assert obj.rca_weight == w
    fresh = make("fast", stars)
    fresh.load_state_dict(synth.state_dict())
    assert fresh.ctx.objective.rca_calibrated and fresh.ctx.objective.rca_weight == w


def test_rca_recalibrate_every_follows_the_student() -> None:
    stars = StarsConfig(
        rca=RCAConfig(weight=1.0, role="align", grad_ratio=0.25, recalibrate_every=3)
    )
    synth = make("fast", stars)
    obj = synth.ctx.objective
    student = tiny_student()
    y = torch.arange(6) % K
    batches = [(torch.randn(6, 3, SIZE, SIZE) * s).requires_grad_(True) for s in (0.5, 3, 2, 1)]
    weights = []
    for i, x in enumerate(batches[:3]):
        with frozen(student):
            obj(x, y, student)
        weights.append(obj.rca_weight)
        if i == 0:  # a measurement in between neither calibrates nor counts as a step
            obj.grad_norms(torch.randn(6, 3, SIZE, SIZE), y, student)
    assert weights[0] == weights[1] == weights[2]  # steps 1 and 2 keep step 0's weight
    # A checkpoint taken here resumes the count: the next step (3) calibrates again.
    fresh = make("fast", stars)
    fresh.load_state_dict(synth.state_dict())
    for o in (obj, fresh.ctx.objective):
        with frozen(student):
            o(batches[3], y, student)
    assert obj.rca_weight != weights[0]
    assert fresh.ctx.objective.rca_weight == pytest.approx(obj.rca_weight)
    with frozen(student):
        norms = obj.grad_norms(batches[3].detach(), y, student)
    assert norms["rca"] / norms["bn"] == pytest.approx(0.25, rel=1e-3)


def test_rca_grad_ratio_waits_for_the_student() -> None:
    cfg = FastSynthesis(batch_size=6, nz=16, g_steps=1, warmup_epochs=1, memory_size=64)
    stars = StarsConfig(rca=RCAConfig(weight=1.0, role="align", grad_ratio=0.5))
    synth = build(cfg, stars)
    student = tiny_student()
    synth.synthesize(student)  # warm-up: no student, nothing to calibrate against
    assert not synth.ctx.objective.rca_calibrated
    synth.ctx.epoch = 1
    step = synth.synthesize(student)
    assert synth.ctx.objective.rca_calibrated
    assert step.losses["rca_weight"] == pytest.approx(synth.ctx.objective.rca_weight)


class _Echo(nn.Module):
    """A 'student' that answers with the teacher's logits (it agrees on every sample) and the
    teacher's features reweighted per dimension (so the relations differ), over T = 2; it
    has no spiking layers."""

    T = 2

    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.teacher = teacher
        self.num_classes = teacher.num_classes

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, z = self.teacher.forward_features(x)
        f = f * torch.linspace(0.05, 3.0, f.shape[1])
        return torch.stack([f, f]), torch.stack([z, z])

    def bn_layers(self) -> list[nn.Module]:
        return []

    def spiking_neurons(self) -> list[tuple[str, nn.Module]]:
        return []


@pytest.mark.parametrize("term", ["tar", "spike_tar"])
def test_each_new_term_alone_changes_the_images(term: str) -> None:
    """Spike-aware TAR on its own (or TAR on the last layer only) moves the images away from
    the baseline's; the same term at weight 0 leaves them bit for bit."""
    student = tiny_student()
    on = StarsConfig(
        tar=TARConfig(weight=5.0 if term == "tar" else 0.0, layers=(-1,)),
        spike_tar=SpikeTARConfig(weight=5.0 if term == "spike_tar" else 0.0),
    )
    base = make("fast", StarsConfig()).synthesize(student).images
    assert not torch.equal(make("fast", on).synthesize(student).images, base)


def test_schedule_scales_the_stars_weights_by_epoch() -> None:
    """A ``step`` schedule ending at epoch 1: STARS acts in epoch 0; from epoch 1 on its weight
    is 0, so the images are the baseline's bit for bit (same synthesizer state)."""
    stars = STARS_ON.model_copy(update={"schedule": WeightSchedule(kind="step", end_epoch=1)})
    student = tiny_student()
    sched, base = make("fast", stars), make("fast", StarsConfig())
    sched.ctx.epoch = base.ctx.epoch = 1
    assert sched.ctx.objective.scale == 0.0
    assert torch.equal(sched.synthesize(student).images, base.synthesize(student).images)
    sched.ctx.epoch = 0
    assert sched.ctx.objective.scale == 1.0
    assert sched.synthesize(student).losses["spike_tar"] != 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_generator_runs_in_the_objective_precision(kind: str, precision: str) -> None:
    """``precision: bf16`` runs the generator's convolutions under autocast (they are most of
    a synthesis step's work), and the images that reach the bank are fp32 either way."""
    synth = build_synthesizer(
        tiny_case(kind),
        StarsConfig(),
        teacher=tiny_teacher(),
        num_classes=K,
        image_size=SIZE,
        mean=MEAN,
        std=STD,
        device=torch.device("cpu"),
        seed=0,
        precision=precision,
    )
    generator = getattr(synth, "generator", None)
    dtypes: set[torch.dtype] = set()
    if isinstance(generator, nn.Module):
        for m in generator.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    step = synth.synthesize(tiny_student())
    assert step.images.dtype == torch.float32
    assert synth.bank.sample(3, generator=torch.Generator()).dtype == torch.float32
    if kind == "deepinversion":
        assert not dtypes  # its images are a parameter tensor: no generator convolutions
        return
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert dtypes == {want}


@pytest.mark.parametrize("kind", KINDS)
def test_a_rank_state_over_the_shared_bank_resumes_exactly(kind: str) -> None:
    """What a data-parallel checkpoint keeps per rank (the state without its bank) put back
    over the shared bank is the whole state: the resumed synthesizer repeats the original."""
    from stars.synthesis.synthesizers import with_bank, without_bank

    student = tiny_student()
    a = make(kind, STARS_ON)
    a.synthesize(student)
    full = copy.deepcopy(a.state_dict())  # the optimizers' state is shared, not copied
    own = without_bank(full)
    assert "bank" not in own["ctx"] and "bank" in full["ctx"]
    b = make(kind, STARS_ON, seed=7)
    b.load_state_dict(with_bank(own, full))
    assert len(b.bank) == len(a.bank)
    sa, sb = a.synthesize(student), b.synthesize(student)
    assert torch.equal(sa.images, sb.images)
    assert torch.equal(a.bank.pixels(), b.bank.pixels())


def test_lowest_loss_keeps_the_first_lowest_step_as_a_copy() -> None:
    from stars.synthesis.synthesizers import LowestLoss

    best = LowestLoss()
    with pytest.raises(RuntimeError, match="no step"):
        _ = best.images
    x = torch.zeros(2, 3)
    for i, total in enumerate([3.0, 1.0, 1.0, 2.0]):
        x.fill_(i)  # the caller's tensor changes in place after each offer
        best.offer(torch.tensor(total), x)
    assert best.trace == [3.0, 1.0, 1.0, 2.0]
    assert torch.equal(best.images, torch.ones(2, 3))  # step 1, not the tie at step 2
