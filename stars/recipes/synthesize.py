"""``stars synthesize``: a teacher-valid synthetic dataset with a quality report.

Two sources:

- :func:`synthesize_dataset` (``stars synthesize CONFIG --num N --out DIR``): the configured
  synthesizer, teacher only, optimized to its method's own budget before any image is kept
  (:mod:`stars.synthesis.budget`; ``--steps`` scales it), ``N`` images split evenly over
  the classes (:mod:`stars.synthesis.export`).
- :func:`export_run` (``stars synthesize --from-run RUN_DIR --out DIR``): the memory bank a
  ``stars distill`` run trained its student on, read from its ``checkpoint.safetensors``.

Either way ``DIR`` holds ``images/<class name>/*.png`` (torchvision's ``ImageFolder`` loads
``DIR/images`` with the intended labels), ``grid.png`` (a row per class, named) and
``quality.json`` (:mod:`stars.synthesis.quality`, also printed as tables). ``DIR`` appears
whole or not at all: bad input is refused before any work, and a failure removes what was
written. ``stars evaluate WEIGHTS --data DIR`` evaluates a model on the set; for the teacher
its top-1 is the report's agreement.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor
from torch.utils.data import Dataset

from stars.config import CifarData, DataConfig, RunConfig, load_config
from stars.data.classes import class_folders, class_names
from stars.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    eval_transform,
    read_image_folder,
)
from stars.distill.checkpoint import load_state
from stars.errors import StarsError
from stars.models.factory import build_teacher
from stars.models.teachers import ANNTeacher
from stars.pipeline import data_geometry, save_grid, synthesizer_for
from stars.run_dir import CHECKPOINT
from stars.runtime import progress_bar, resolve_device, seed_everything
from stars.synthesis.budget import Budget, budget_config, method_budget
from stars.synthesis.export import (
    batch_labels,
    class_quotas,
    describe_split,
    requested_labels,
    staged_output,
    take,
    write_image_folder,
)
from stars.synthesis.quality import QualityReport, quality_report, quality_tables
from stars.synthesis.synthesizers import SynthesizerBase

__all__ = [
    "GRID_FILE",
    "IMAGES_DIR",
    "QUALITY_FILE",
    "SyntheticSet",
    "export_run",
    "load_synthetic_set",
    "synthesize_dataset",
]

QUALITY_FILE = "quality.json"
IMAGES_DIR = "images"
GRID_FILE = "grid.png"
Stats = tuple[float, float, float]
MAX_BATCH_FACTOR = 10
"""A method that labels its own images gets this many times the batches that exact
quotas would take before a class still short of images is an error."""


@dataclass(frozen=True)
class SyntheticSet:
    """A written synthetic dataset.

    Attributes:
        out: the folder (``images/``, ``grid.png``, ``quality.json``).
        report: the quality figures.
        record: everything ``quality.json`` holds (the report plus how the set was made).
    """

    out: Path
    report: QualityReport
    record: dict[str, Any]


def _teacher(cfg: RunConfig, device: torch.device) -> ANNTeacher:
    geo = data_geometry(cfg)
    return build_teacher(
        cfg.teacher, num_classes=geo.num_classes, image_size=geo.image_size, dataset=geo.name
    ).to(device)


def synthesize_dataset(
    cfg: RunConfig,
    *,
    num: int,
    out: Path,
    steps: float = 1.0,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> SyntheticSet:
    """Synthesize ``num`` class-balanced images from the teacher alone and write them.

    Args:
        cfg: the run config (teacher, data geometry, ``synthesis`` and ``stars`` blocks).
        num: images to keep, ``>=`` the number of classes.
        out: the output folder (new, empty, or replaced with ``overwrite``).
        steps: factor on the method's budget (``--steps``; see
            :func:`stars.synthesis.budget.method_budget`).
        overwrite: replace a non-empty ``out`` (only once the new set is complete).
        console: where tables and messages go.
        show_progress: show progress bars.

    Raises:
        StarsError: bad input (``num``, ``out``, ``steps``, a method that cannot run
            without a student) before any work; a method that labels its own images and
            cannot fill every class within ``MAX_BATCH_FACTOR`` x the batches exact quotas
            take; too many non-finite batches in a row. Nothing is written then.
    """
    console = console or Console()
    geo = data_geometry(cfg)
    names = class_names(cfg.data)
    quotas = class_quotas(num, geo.num_classes)
    plan = method_budget(cfg, steps)
    t0, c0 = time.time(), time.process_time()
    with staged_output(out, overwrite=overwrite) as stage:
        device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        teacher = _teacher(cfg, device)
        synth = synthesizer_for(budget_config(cfg, plan), teacher, geo, device)
        synth.store = False
        console.print(describe_split(quotas, names), soft_wrap=True)
        console.print(f"{cfg.synthesis.kind}: {plan.describe()}", soft_wrap=True)
        pixels, labels, made = _fill_quotas(
            synth, plan, quotas, names, cfg, console if show_progress else Console(quiet=True)
        )
        record = {
            "source": "synthesize",
            "config": cfg.name,
            "method": cfg.synthesis.kind,
            "budget": asdict(plan),
            "split": describe_split(quotas, names),
            "batches": made,
            "dropped_images": made * cfg.synthesis.batch_size - num,
        }
        result = _write_set(stage, out, cfg, teacher, pixels, labels, names, record, t0, c0)
    _show(result, console)
    return result


def _fill_quotas(
    synth: SynthesizerBase,
    plan: Budget,
    quotas: list[int],
    names: tuple[str, ...],
    cfg: RunConfig,
    console: Console,
) -> tuple[Tensor, Tensor, int]:
    """The warm-up, then batches until every class has its quota: ``(pixels [N, C, H, W]
    uint8, labels [N], kept batches made)``."""
    ctx, batch = synth.ctx, cfg.synthesis.batch_size
    need = list(quotas)
    num, k = sum(quotas), len(quotas)
    max_batches = MAX_BATCH_FACTOR * math.ceil(num / batch)
    kept_pix: list[Tensor] = []
    kept_lab: list[Tensor] = []
    made = bad = cursor = 0
    with progress_bar(console) as bar:
        warm = bar.add_task("warm-up", total=plan.warmup_batches, info="")
        for _ in range(plan.warmup_batches):
            step = synth.synthesize(None)
            bar.update(warm, advance=1, info=f"bn {step.losses.get('bn', 0.0):.2f}")
        task = bar.add_task("synthesize", total=num, info="")
        while sum(need) > 0:
            if made >= max_batches:
                short = ", ".join(
                    f"{names[c]} ({quotas[c] - need[c]} of {quotas[c]})"
                    for c in range(k)
                    if need[c] > 0
                )
                raise StarsError(
                    f"after {made} batches, synthesis.kind {cfg.synthesis.kind} (which labels "
                    f"images with the teacher's argmax) left classes short: {short}. Use a "
                    "method that takes labels (fast, deepinversion) or a larger --steps"
                )
            with requested_labels(ctx, batch_labels(need, batch, cursor)):
                step = synth.synthesize(None)
            cursor = (cursor + batch) % k
            made += 1
            if not step.finite:
                bad += 1
                if bad >= cfg.distill.max_bad_steps:
                    raise StarsError(
                        f"{bad} non-finite synthesis batches in a row; lower the synthesis "
                        "learning rate or the loss weights (--set synthesis.lr_g=...)"
                    )
                continue
            bad = 0
            idx = take(step.labels.cpu(), need)
            kept_pix.append(ctx.bank.to_pixels(step.images[idx]))
            kept_lab.append(step.labels.cpu()[idx])
            bar.update(task, advance=len(idx), info=f"bn {step.losses.get('bn', 0.0):.2f}")
    return torch.cat(kept_pix), torch.cat(kept_lab), made


def export_run(
    run_dir: Path,
    *,
    out: Path,
    num: int | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> SyntheticSet:
    """Write the memory bank of a finished (or stopped) ``stars distill`` run as a set.

    Args:
        run_dir: the run directory (``config.yaml``, ``checkpoint.safetensors``).
        out: the output folder (new, empty, or replaced with ``overwrite``).
        num: a class-balanced subset of this many images, newest first in each class
            (default: every image of the bank).
        overwrite: replace a non-empty ``out``.
        console: where tables and messages go.

    Raises:
        StarsError: no run there, no checkpoint, an empty bank, or (with ``num``) too few
            images of some class. Nothing is written then.
    """
    console = console or Console()
    if not (run_dir / "config.yaml").is_file():
        raise StarsError(
            f"--from-run {run_dir}: no config.yaml there; give the folder of a `stars distill` "
            "run (e.g. runs/quickstart)"
        )
    if not (run_dir / CHECKPOINT).is_file():
        raise StarsError(
            f"--from-run {run_dir}: no {CHECKPOINT} there, so no memory bank (a run writes it "
            "after its first epoch)"
        )
    cfg = load_config(run_dir / "config.yaml")
    geo = data_geometry(cfg)
    names = class_names(cfg.data)
    try:
        bank = load_state(run_dir / CHECKPOINT)["synthesizer"]["ctx"]["bank"]
        pixels, labels = bank["pixels"], bank["labels"].long()
    except (KeyError, TypeError):
        raise StarsError(
            f"--from-run {run_dir}: {CHECKPOINT} holds no memory bank (not a distill run?)"
        ) from None
    if pixels.numel() == 0:
        raise StarsError(f"--from-run {run_dir}: the memory bank in {CHECKPOINT} is empty")
    valid = ((labels >= 0) & (labels < geo.num_classes)).nonzero().flatten()
    if valid.numel() == 0:
        raise StarsError(f"--from-run {run_dir}: no bank image has a class label")
    if valid.numel() < labels.numel():
        console.print(
            f"[yellow]{labels.numel() - valid.numel()} bank image(s) without a class label "
            "are left out.[/]"
        )
    pixels, labels = pixels[valid], labels[valid]
    split = f"the whole bank: {labels.numel()} images"
    if num is not None:
        quotas = class_quotas(num, geo.num_classes)
        need = list(quotas)
        newest = take(labels.flip(0), need)  # the newest images of each class
        if sum(need):
            have = torch.bincount(labels, minlength=geo.num_classes).tolist()
            short = ", ".join(f"{names[c]} ({have[c]})" for c in range(len(need)) if need[c])
            raise StarsError(
                f"--num {num}: the bank has too few images of {short} for "
                f"{min(quotas)} per class; lower --num or leave it out to export the whole bank"
            )
        keep = sorted(labels.numel() - 1 - i for i in newest)
        pixels, labels = pixels[keep], labels[keep]
        split = describe_split(quotas, names)
    t0, c0 = time.time(), time.process_time()
    with staged_output(out, overwrite=overwrite) as stage:
        teacher = _teacher(cfg, resolve_device(cfg.device))
        record = {
            "source": "run",
            "run_dir": str(run_dir),
            "config": cfg.name,
            "method": cfg.synthesis.kind,
            "split": split,
        }
        result = _write_set(stage, out, cfg, teacher, pixels, labels, names, record, t0, c0)
    _show(result, console)
    absent = [c.name for c in result.report.per_class if c.count == 0]
    if absent:
        console.print(
            f"[yellow]The bank has no image of {', '.join(absent)}: their folders are empty "
            "(torchvision's ImageFolder needs allow_empty=True to load the set).[/]"
        )
    return result


def _write_set(
    stage: Path,
    out: Path,
    cfg: RunConfig,
    teacher: ANNTeacher,
    pixels: Tensor,
    labels: Tensor,
    names: tuple[str, ...],
    record: dict[str, Any],
    t0: float,
    c0: float,
) -> SyntheticSet:
    """Measure the set, then write images, grid and ``quality.json`` into ``stage``."""
    geo = data_geometry(cfg)
    report = quality_report(
        teacher,
        pixels,
        labels,
        mean=geo.mean,
        std=geo.std,
        tail=cfg.stars.tar,
        class_names=names,
        student_vth=cfg.student.neuron.v_threshold,
    )
    folders = class_folders(names)
    write_image_folder(pixels, labels, folders, stage / IMAGES_DIR)
    per_class = max(1, min(8, max(c.count for c in report.per_class)))
    save_grid(pixels, labels, stage / GRID_FILE, per_class=per_class, class_names=names)
    full = {
        **record,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - c0,
        "torch_threads": torch.get_num_threads(),
        "teacher": str(cfg.teacher.checkpoint or "bundled"),
        "classes": list(names),
        "folders": list(folders),
        **report.to_dict(),
    }
    (stage / QUALITY_FILE).write_text(json.dumps(full, indent=2) + "\n")
    return SyntheticSet(out, report, full)


def _show(result: SyntheticSet, console: Console) -> None:
    for table in quality_tables(result.report):
        console.print(table)
    rec = result.record
    console.print(
        f"wrote {result.report.num_images} images to {result.out / IMAGES_DIR} (ImageFolder), "
        f"the grid to {result.out / GRID_FILE} and the report to {result.out / QUALITY_FILE} "
        f"({rec['seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} s CPU)",
        soft_wrap=True,
    )


def _normalization(data: DataConfig) -> tuple[Stats, Stats]:
    if isinstance(data, CifarData):
        is10 = data.kind == "cifar10"
        return (CIFAR10_MEAN, CIFAR10_STD) if is10 else (CIFAR100_MEAN, CIFAR100_STD)
    return data.mean, data.std


def load_synthetic_set(
    path: Path, data: DataConfig, *, num_classes: int, image_size: int
) -> Dataset[Any] | None:
    """The images of a set written here (``path/quality.json`` marks one), labelled by
    folder, normalized for a model trained on ``data``; ``None`` when ``path`` is not one.

    Raises:
        DataError: the set's class count differs from ``num_classes``, or it cannot be read.
    """
    if not (path / QUALITY_FILE).is_file():
        return None
    mean, std = _normalization(data)
    transform = eval_transform(image_size, mean, std)
    return read_image_folder(path / IMAGES_DIR, transform, num_classes, expected_by="the model")
