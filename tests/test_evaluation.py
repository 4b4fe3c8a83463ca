"""Evaluation in forwards of a bounded size: ``evaluation.forward_batch`` changes only how
many images one forward takes, never a top-1, a firing rate or an energy figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from rich.console import Console
from tiny_run import tiny_run_config
from torch import Tensor, nn

from stars import pipeline
from stars.config import StudentConfig, load_config
from stars.evaluation import CPU_FORWARD_PIXELS, forward_batch, split_batches, top1
from stars.models.students import build_student
from stars.pipeline import build_components, evaluate_student


def test_auto_bounds_pixels_per_forward_on_cpu_only() -> None:
    cpu = torch.device("cpu")
    # The shipped numbers: a T = 4 student on 32 px takes 64 images a forward, a teacher 256.
    assert forward_batch("auto", steps=4, image_size=32, device=cpu) == 64
    assert forward_batch("auto", steps=1, image_size=32, device=cpu) == 256
    assert forward_batch("auto", steps=4, image_size=64, device=cpu) == 16
    for steps, size in ((1, 32), (4, 32), (8, 64), (6, 224)):
        n = forward_batch("auto", steps=steps, image_size=size, device=cpu)
        assert n is not None and n >= 1
        # The most that fit, unless even one image is over the bound.
        assert n * steps * size * size <= CPU_FORWARD_PIXELS or n == 1
        assert (n + 1) * steps * size * size > CPU_FORWARD_PIXELS
    assert forward_batch("auto", steps=4, image_size=32, device=torch.device("cuda")) is None
    assert forward_batch(7, steps=4, image_size=32, device=torch.device("cuda")) == 7


@examples(60)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    chunk=st.none() | st.integers(1, 10),
)
def test_split_batches_keeps_every_image_in_order(sizes: list[int], chunk: int | None) -> None:
    total = sum(sizes)
    images = torch.arange(total, dtype=torch.float32).view(total, 1, 1, 1)
    labels = torch.arange(total)
    batches = list(zip(torch.split(images, sizes), torch.split(labels, sizes), strict=True))
    pieces = list(split_batches(batches, chunk))
    assert torch.equal(torch.cat([x for x, _ in pieces]), images)
    assert torch.equal(torch.cat([y for _, y in pieces]), labels)
    for x, y in pieces:
        assert x.shape[0] == y.shape[0] >= 1
        assert chunk is None or x.shape[0] <= chunk
    # Only batches over the bound are split: their count is the fewest that fit.
    want = sum(-(-n // chunk) if chunk is not None else 1 for n in sizes)
    assert len(pieces) == want


class _Largest:
    """The largest batch a module's forwards took (a forward pre-hook)."""

    def __init__(self, module: object) -> None:
        assert isinstance(module, nn.Module)
        self.most = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.most = max(self.most, args[0].shape[0])


def test_top1_in_chunks_is_top1_whole() -> None:
    # A student's forward in eval mode is per image (BN on running statistics, neurons reset
    # per forward), so top-1 does not depend on the chunk at all: the figures are compared
    # for equality. (Splitting could change a convolution's blocking and so its summation
    # order; on this CPU the logits were bit-identical, and a flipped spike would also need
    # a membrane within a few ulp of the threshold.)
    torch.manual_seed(0)
    student = build_student(StudentConfig(arch="spiking_tiny", T=2), num_classes=10)
    # Scaled-up inputs make the student fire, so that the prediction depends on the images.
    x, y = 3 * torch.randn(30, 3, 32, 32), torch.randint(0, 10, (30,))
    batches = [(x[:17], y[:17]), (x[17:], y[17:])]
    whole = top1(student, batches, torch.device("cpu"))
    seen = _Largest(student)
    chunked = top1(student, batches, torch.device("cpu"), chunk=4)
    seen.handle.remove()
    assert seen.most == 4
    assert chunked == whole
    assert top1(student, batches, torch.device("cpu"), chunk=4, max_images=9) == top1(
        student, batches, torch.device("cpu"), max_images=9
    )


@pytest.mark.parametrize("forward", [3, 1000])
def test_evaluate_student_follows_forward_batch(
    tmp_path: Path, cifar_root: Path, teacher_file: Path, forward: int
) -> None:
    evaluation = {"every_epochs": 1, "batch_size": 25, "forward_batch": forward}
    cfg_path = tiny_run_config(tmp_path, teacher_file, data_root=cifar_root, evaluation=evaluation)
    comp = build_components(load_config(cfg_path))
    loader = pipeline.test_loader(comp.cfg, Console(quiet=True))
    assert loader is not None
    seen = _Largest(comp.student), _Largest(comp.teacher)
    ev = evaluate_student(comp, loader)
    for s in seen:
        s.handle.remove()
    assert [s.most for s in seen] == [min(forward, 25)] * 2
    # The same figures whatever the chunk (see test_top1_in_chunks_is_top1_whole).
    reference = evaluate_student(
        build_components(load_config(cfg_path, ["evaluation.forward_batch=25"])), loader
    )
    assert ev.student_top1 == reference.student_top1
    assert ev.teacher_top1 == reference.teacher_top1
    assert ev.spikes.firing_rates == pytest.approx(reference.spikes.firing_rates, rel=1e-12)
    assert ev.spikes.synops == pytest.approx(reference.spikes.synops, rel=1e-12)
