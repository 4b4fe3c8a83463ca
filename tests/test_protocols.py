"""Every concrete teacher, student, synthesizer, distiller, data source and tap satisfies the
Protocol its seam is typed with (docs/design.md section 3).

Checked twice: by mypy (each annotated assignment below fails ``mypy --strict`` when a
class drifts from its Protocol) and at run time (``isinstance`` against the
runtime-checkable Protocols). The negative checks show that the run-time check can fail: an
object that has every member of a Protocol but one is not an instance of it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from synthesis.test_synthesizers import tiny_case
from torch import nn
from torch.utils.data import TensorDataset
from typing_extensions import get_protocol_members

from stars.config import (
    DAFLSynthesis,
    DeepInversionSynthesis,
    DFADSynthesis,
    FastSynthesis,
    NeuronConfig,
    SpikeTARConfig,
    StarsConfig,
    StudentConfig,
    SynthesisConfig,
)
from stars.data.datasets import ImageSource
from stars.data.protocols import DataSource
from stars.distill.distiller import KDDistiller
from stars.distill.protocols import Distiller
from stars.models.protocols import Network, SpikingStudent, Teacher
from stars.models.students import SpikingResNet, SpikingVGG, build_student
from stars.models.teachers import VGG, BlockVGG, CifarResNet, ResNet, WideResNet
from stars.neurons.membrane import MembraneTap
from stars.synthesis.factory import build_synthesizer
from stars.synthesis.methods import KINDS as REGISTERED
from stars.synthesis.priors import BatchStatsTap, FeatureTap, extract_bn_prior
from stars.synthesis.protocols import Synthesizer, Tap
from stars.synthesis.spike_tar import SpikeTailTerm

SIZE, K = 16, 4
SYNTHESIS: dict[str, SynthesisConfig] = {
    "deepinversion": DeepInversionSynthesis(batch_size=2, iterations=1, memory_size=4),
    "dafl": DAFLSynthesis(batch_size=2, nz=8, g_steps=1, memory_size=4),
    "dfad": DFADSynthesis(batch_size=2, nz=8, g_steps=1, memory_size=4),
    "fast": FastSynthesis(batch_size=2, nz=8, g_steps=1, memory_size=4, warmup_epochs=0),
}


def _teachers() -> list[Teacher]:
    """One teacher of every class (the presets are these classes at other depths)."""
    return [
        CifarResNet(8, num_classes=K, image_size=SIZE),
        ResNet((1, 1, 1, 1), num_classes=K, image_size=SIZE),
        VGG("vgg11", num_classes=K, image_size=SIZE),
        BlockVGG("vgg8", num_classes=K, image_size=SIZE),
        WideResNet(16, 1, num_classes=K, image_size=SIZE),
    ]


def _student(arch: str = "spiking_tiny") -> SpikingStudent:
    cfg = StudentConfig.model_validate({"arch": arch, "T": 2, "neuron": NeuronConfig()})
    return build_student(cfg, num_classes=K, image_size=SIZE)


def _without(obj: object, protocol: type, missing: str) -> SimpleNamespace:
    """A stand-in with every member of ``protocol`` read from ``obj``, except ``missing``."""
    members = get_protocol_members(protocol)
    assert missing in members
    return SimpleNamespace(**{m: getattr(obj, m) for m in members if m != missing})


def _check(obj: object, protocol: type) -> None:
    """``obj`` satisfies ``protocol``; a copy of its members does too; a copy lacking any
    one member does not."""
    assert isinstance(obj, protocol)
    members = get_protocol_members(protocol)
    full = SimpleNamespace(**{m: getattr(obj, m) for m in members})
    assert isinstance(full, protocol)
    for m in sorted(members):
        assert not isinstance(_without(obj, protocol, m), protocol), m


def test_every_teacher_class_is_a_teacher() -> None:
    for teacher in _teachers():
        _check(teacher, Teacher)
        assert not isinstance(teacher, SpikingStudent)  # no T, no spiking_neurons()


@pytest.mark.parametrize("arch", ["spiking_tiny", "spiking_resnet20"])
def test_every_student_class_is_a_spiking_student(arch: str) -> None:
    student = _student(arch)
    assert isinstance(student, SpikingVGG | SpikingResNet)
    _check(student, SpikingStudent)
    net: Network = student
    _check(net, Network)


def _synthesis(kind: str) -> SynthesisConfig:
    """This file's config of ``kind``, or for a method registered later its tiny case."""
    return SYNTHESIS[kind] if kind in SYNTHESIS else tiny_case(kind)


@pytest.mark.parametrize("kind", REGISTERED)
def test_every_synthesizer_is_a_synthesizer(kind: str) -> None:
    concrete = build_synthesizer(
        _synthesis(kind),
        StarsConfig(),
        teacher=CifarResNet(8, num_classes=K, image_size=SIZE).eval(),
        num_classes=K,
        image_size=SIZE,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        device=torch.device("cpu"),
        seed=0,
    )
    synth: Synthesizer = concrete
    _check(synth, Synthesizer)
    # The protocol's members are the shared context's: the bank, the store flag, the hook.
    ctx = concrete.ctx
    synth.store = False
    synth.set_epoch(3)
    assert synth.bank is ctx.bank and synth.objective is ctx.objective
    assert ctx.store is False and ctx.epoch == 3


def test_the_distiller_is_a_distiller() -> None:
    teacher, student = CifarResNet(8, num_classes=K, image_size=SIZE).eval(), _student()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    distiller: Distiller = KDDistiller(
        student,
        teacher,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0),
        temperature=4.0,
        spike=SpikeTailTerm(SpikeTARConfig(), extract_bn_prior(teacher.bn_layers())),
    )
    _check(distiller, Distiller)


def test_the_image_source_is_a_data_source() -> None:
    images = TensorDataset(torch.zeros(2, 3, SIZE, SIZE), torch.zeros(2, dtype=torch.long))
    source: DataSource = ImageSource(
        "imagefolder", K, SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), lambda _: images, None
    )
    _check(source, DataSource)


def test_every_tap_is_a_tap() -> None:
    bn = nn.BatchNorm2d(1)
    feature: Tap[torch.Tensor] = FeatureTap([bn])
    stats: Tap[tuple[torch.Tensor, torch.Tensor]] = BatchStatsTap([bn])
    membrane: Tap[torch.Tensor] = MembraneTap([])
    for tap in (feature, stats, membrane):
        _check(tap, Tap)


def test_both_generators_are_generators() -> None:
    """mypy checks the assignments against ``Generator.__call__(z, y=None)``; the calls check
    that each returns images of the batch's size."""
    from stars.synthesis.generators import ConvGenerator, PixelGenerator
    from stars.synthesis.protocols import Generator

    conv: Generator = ConvGenerator(8, image_size=8, ngf=4, num_classes=4)
    pixels: Generator = PixelGenerator(3, 3, 8, generator=torch.Generator().manual_seed(0))
    z = torch.randn(3, 8)
    assert conv(z).shape == (3, 3, 8, 8)
    assert conv(z, torch.tensor([0, 1, 3])).shape == (3, 3, 8, 8)
    assert pixels(z).shape == (3, 3, 8, 8)
