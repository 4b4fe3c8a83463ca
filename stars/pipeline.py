"""The components a config describes, and how a student is evaluated.

``build_components(cfg)`` makes the teacher, the spiking student, the synthesizer (with the
STARS plug-in) and the distiller; ``evaluate_student`` measures top-1, firing and energy on
the evaluation split (``test_loader``). The recipes (:mod:`stars.recipes`) run them:
``stars distill`` is :mod:`stars.recipes.distill`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from stars.config import (
    CifarData,
    ImageFolderData,
    RunConfig,
)
from stars.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DataError,
    build_data,
    stratified_subset,
)
from stars.distill.distiller import KDDistiller
from stars.distill.protocols import Distiller
from stars.distill.spikes import ANNCost, SpikeStats, measure_ann, measure_spikes
from stars.distributed import (
    DistInfo,
    ddp_features,
)
from stars.errors import StarsError
from stars.evaluation import forward_batch, split_batches, top1
from stars.models.factory import build_teacher
from stars.models.protocols import SpikingStudent, Teacher
from stars.models.students import build_student
from stars.optim import build_optimizer, build_scheduler
from stars.runtime import (
    maybe_compile,
    resolve_device,
    seed_everything,
)
from stars.synthesis.export import save_labelled_grid
from stars.synthesis.factory import build_synthesizer
from stars.synthesis.priors import extract_bn_prior
from stars.synthesis.protocols import Synthesizer
from stars.synthesis.spike_tar import SpikeTailTerm
from stars.synthesis.synthesizers import SynthesizerBase

__all__ = [
    "VAL_SEED",
    "Components",
    "DataGeometry",
    "Evaluation",
    "build_components",
    "data_geometry",
    "evaluate_student",
    "save_grid",
    "synthesizer_for",
    "test_loader",
    "warmup_epochs",
]


@dataclass(frozen=True)
class DataGeometry:
    """What the models need to know about the data, without touching the disk."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def data_geometry(cfg: RunConfig) -> DataGeometry:
    """Classes, image size and normalization of the configured dataset."""
    data = cfg.data
    if isinstance(data, CifarData):
        is10 = data.kind == "cifar10"
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if is10 else (CIFAR100_MEAN, CIFAR100_STD)
        return DataGeometry(data.kind, data.num_classes, data.image_size, mean, std)
    assert isinstance(data, ImageFolderData)
    return DataGeometry("imagefolder", data.num_classes, data.image_size, data.mean, data.std)


@dataclass
class Components:
    """Everything a distillation run is made of."""

    cfg: RunConfig
    device: torch.device
    geometry: DataGeometry
    teacher: Teacher
    student: SpikingStudent
    synthesizer: Synthesizer
    distiller: Distiller
    info: DistInfo = field(default_factory=DistInfo)


def warmup_epochs(cfg: RunConfig) -> int:
    """Epochs without KD and without the adversarial terms (the method's
    :attr:`~stars.synthesis.methods.MethodConfig.kd_warmup_epochs`: Fast's warm-up)."""
    return cfg.synthesis.kd_warmup_epochs


def synthesizer_for(
    cfg: RunConfig, teacher: Teacher, geo: DataGeometry, device: torch.device
) -> SynthesizerBase:
    """The configured synthesizer around ``teacher`` (with the STARS plug-in)."""
    return build_synthesizer(
        cfg.synthesis,
        cfg.stars,
        teacher=teacher,
        num_classes=geo.num_classes,
        image_size=geo.image_size,
        mean=geo.mean,
        std=geo.std,
        device=device,
        seed=cfg.seed,
        student_vth=cfg.student.neuron.v_threshold,
        precision=cfg.precision,
        channels_last=cfg.channels_last is not False,
        compile=cfg.compile,
    )


def build_components(cfg: RunConfig, info: DistInfo | None = None) -> Components:
    """Build teacher, student, synthesizer and distiller from a validated config.

    Under torchrun (``info.world > 1``) each rank builds a synthesizer for its share of every
    batch with its own seed, and the student's ``forward_features`` goes through DDP.
    """
    info = info or DistInfo()
    device = resolve_device(cfg.device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    geo = data_geometry(cfg)
    seed_everything(cfg.seed)
    ann = build_teacher(
        cfg.teacher, num_classes=geo.num_classes, image_size=geo.image_size, dataset=geo.name
    ).to(device)
    torch.manual_seed(cfg.seed)
    try:
        snn = build_student(cfg.student, num_classes=geo.num_classes, image_size=geo.image_size)
    except ValueError as exc:
        raise StarsError(f"student: {exc}") from None
    snn = snn.to(device)
    _dry_run(cfg, ann, snn, geo, device)
    if cfg.channels_last is True:
        ann = ann.to(memory_format=torch.channels_last)
        snn = snn.to(memory_format=torch.channels_last)
    teacher: Teacher = ann
    student: SpikingStudent = snn
    if cfg.compile:
        teacher, student = maybe_compile(ann), maybe_compile(snn, graph=device.type != "cpu")
    synth_cfg = cfg
    if info.enabled:
        for field_path, size in (
            ("synthesis.batch_size", cfg.synthesis.batch_size),
            ("distill.batch_size", cfg.distill.batch_size),
        ):
            if size % info.world:
                raise StarsError(
                    f"{field_path} ({size}) must be divisible by the number of processes "
                    f"({info.world}): each rank takes an equal share"
                )
        synth_cfg = cfg.model_copy(
            update={
                "seed": cfg.seed + 1000 * info.rank,
                "synthesis": cfg.synthesis.model_copy(
                    update={"batch_size": cfg.synthesis.batch_size // info.world}
                ),
            }
        )
    synthesizer = synthesizer_for(synth_cfg, teacher, geo, device)
    optimizer = build_optimizer(cfg.distill.optimizer, student.parameters())
    warm = warmup_epochs(cfg)
    scheduler = build_scheduler(
        cfg.distill.schedule,
        optimizer,
        epochs=max(1, cfg.distill.epochs - warm),
        steps_per_epoch=max(1, cfg.distill.kd_steps_per_epoch),
    )
    distiller = KDDistiller(
        student,
        teacher,
        optimizer=optimizer,
        scheduler=scheduler,
        temperature=cfg.distill.temperature,
        loss=cfg.distill.loss,
        rca_weight=cfg.stars.rca.student_weight,
        rca_features=cfg.stars.rca.features,
        rca_delta=cfg.stars.rca.delta,
        rca_per_step=cfg.stars.rca.student_per_step,
        spike=SpikeTailTerm(cfg.stars.spike_tar, extract_bn_prior(teacher.bn_layers())).to(device),
        spike_weight=cfg.stars.spike_tar.student_weight,
        device=device,
        precision=cfg.precision,
        seed=cfg.seed + 1 + 1000 * info.rank,
        features_fn=ddp_features(student, info, device) if info.enabled else None,
        distributed=info.enabled,
    )
    return Components(cfg, device, geo, teacher, student, synthesizer, distiller, info)


def _dry_run(
    cfg: RunConfig,
    teacher: Teacher,
    student: SpikingStudent,
    geo: DataGeometry,
    device: torch.device,
) -> None:
    """One forward of both models on two images: a size, T or class count the models cannot
    take is reported before any work (and before a run directory exists)."""
    x = torch.zeros(2, 3, geo.image_size, geo.image_size, device=device)
    models: tuple[tuple[str, Teacher | SpikingStudent, str], ...] = (
        ("teacher", teacher, cfg.teacher.arch),
        ("student", student, cfg.student.arch),
    )
    for role, model, arch in models:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                feats, logits = model.forward_features(x)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StarsError(
                f"{role} {arch} cannot take {geo.image_size}x{geo.image_size} images"
                + (f" at T={cfg.student.T}" if role == "student" else "")
                + f": {first}"
            ) from None
        finally:
            model.train(was)
        if logits.shape[-1] != geo.num_classes:
            raise StarsError(
                f"{role} {arch} outputs {logits.shape[-1]} classes, the data has {geo.num_classes}"
            )
        del feats


# ----------------------------------------------------------------------------- evaluation

VAL_SEED = 12345
"""Seed of the fixed val subset of the training split (``evaluation.split: val``)."""


def test_loader(cfg: RunConfig, console: Console) -> DataLoader[Any] | None:
    """The evaluation split's loader (the test split, or the fixed val subset of the
    training split); None when evaluation is off or there are no such images."""
    if not cfg.evaluation.enabled:
        return None
    try:
        source = build_data(cfg.data)
        if cfg.evaluation.split == "val":
            val = stratified_subset(source.train(augment=False), cfg.evaluation.val_size, VAL_SEED)
            return DataLoader(
                stratified_subset(val, cfg.evaluation.max_images, 0),
                batch_size=cfg.evaluation.batch_size,
                num_workers=cfg.data.num_workers,
            )
        test = source.test()
    except DataError as exc:
        console.print(f"[yellow]No test data: {exc}. Evaluation is skipped.[/]")
        return None
    if test is None:
        console.print("[yellow]No test split configured: evaluation is skipped.[/]")
        return None
    test = stratified_subset(test, cfg.evaluation.max_images, 0)
    return DataLoader(test, batch_size=cfg.evaluation.batch_size, num_workers=cfg.data.num_workers)


def _images_only(loader: DataLoader[Any], limit: int, chunk: int | None) -> Iterator[Tensor]:
    seen = 0
    for x, _ in split_batches(loader, chunk):
        if seen >= limit:
            return
        yield x[: limit - seen]
        seen += x.shape[0]


@dataclass(frozen=True)
class Evaluation:
    student_top1: float
    teacher_top1: float
    spikes: SpikeStats
    teacher_cost: ANNCost
    skipped_images: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "student_top1": self.student_top1,
            "skipped_images": self.skipped_images,
            "teacher_top1": self.teacher_top1,
            "firing_rates": self.spikes.firing_rates,
            "mean_firing_rate": self.spikes.mean_firing_rate,
            "synops_per_image": self.spikes.synops,
            "student_macs_per_image": self.spikes.macs,
            "student_energy_uj": self.spikes.energy_pj / 1e6,
            "teacher_macs_per_image": self.teacher_cost.macs,
            "teacher_energy_uj": self.teacher_cost.energy_pj / 1e6,
        }


def evaluate_student(
    comp: Components, loader: DataLoader[Any], *, teacher_top1: float | None = None
) -> Evaluation:
    """Top-1 of student (and teacher, unless given), firing rates, SynOps and energy."""
    g = comp.geometry
    ev = comp.cfg.evaluation

    def chunk(steps: int) -> int | None:
        return forward_batch(
            ev.forward_batch, steps=steps, image_size=g.image_size, device=comp.device
        )

    s_chunk = chunk(comp.student.T)
    s_acc = top1(comp.student, loader, comp.device, chunk=s_chunk)
    t_acc = (
        teacher_top1
        if teacher_top1 is not None
        else top1(comp.teacher, loader, comp.device, chunk=chunk(1))
    )
    spikes = measure_spikes(comp.student, _images_only(loader, 512, s_chunk), comp.device)
    cost = measure_ann(comp.teacher, (3, g.image_size, g.image_size), comp.device)
    return Evaluation(s_acc, t_acc, spikes, cost, _skipped_images(loader.dataset))


def _skipped_images(ds: object) -> int:
    """Undecodable images the evaluation skipped (ImageFolder sources count them)."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return int(getattr(ds, "num_skipped", 0))


# ----------------------------------------------------------------------------- outputs


def save_grid(
    pixels: Tensor,
    labels: Tensor,
    path: Path,
    *,
    per_class: int = 8,
    max_classes: int = 20,
    class_names: Sequence[str] | None = None,
) -> None:
    """A PNG grid of uint8 images ``[N, C, H, W]`` (oldest first), one row per class
    (labels ``[N]``): the newest ``per_class`` images of each of up to ``max_classes``
    classes; with ``class_names`` (label order) each row is named in a left margin."""
    from torchvision.utils import save_image

    rows: list[Tensor] = []
    classes = sorted({int(c) for c in labels.tolist() if c >= 0})[:max_classes]
    for c in classes:
        pick = pixels[labels == c][-per_class:]  # the newest images of the class
        if pick.shape[0] < per_class:
            pad = torch.zeros((per_class - pick.shape[0], *pixels.shape[1:]), dtype=pixels.dtype)
            pick = torch.cat([pick, pad])
        rows.append(pick)
    if not rows:
        rows = [pixels[:per_class]]
    elif class_names is not None:
        names = [class_names[c] for c in classes]
        return save_labelled_grid(torch.cat(rows), names, path, per_row=per_class)
    grid = torch.cat(rows).float() / 255.0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path), nrow=per_class, padding=1)
