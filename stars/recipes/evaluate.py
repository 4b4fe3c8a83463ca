"""``stars evaluate CHECKPOINT``: top-1 of a teacher or a student on real test images; for a
student also its firing rates, synaptic operations and energy estimate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from stars.config import RunConfig, TeacherTrainConfig
from stars.data.datasets import DataError, build_data, stratified_subset
from stars.distill.spikes import measure_ann, measure_spikes
from stars.errors import StarsError
from stars.evaluation import forward_batch, split_batches, top1
from stars.models.factory import freeze
from stars.models.io import load_model_weights, read_metadata
from stars.models.students import build_student
from stars.models.teachers import build_teacher_arch
from stars.recipes.synthesize import load_synthetic_set
from stars.runtime import resolve_device

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(
    checkpoint: Path,
    *,
    data: Path | None,
    device: str,
    max_images: int | None,
    console: Console,
) -> dict[str, Any]:
    """Evaluate a ``.safetensors`` written by ``train-teacher`` or ``distill``."""
    meta = read_metadata(checkpoint)
    kind = meta.get("kind")
    if kind not in ("teacher", "student") or "config" not in meta:
        raise StarsError(
            f"{checkpoint}: no stars metadata (kind/config); evaluate takes the weights written "
            "by `stars train-teacher` or `stars distill` (with their .json beside them)"
        )
    try:
        cfg: TeacherTrainConfig | RunConfig = (
            TeacherTrainConfig.model_validate(meta["config"])
            if kind == "teacher"
            else RunConfig.model_validate(meta["config"])
        )
    except ValidationError as exc:
        raise StarsError(f"{checkpoint}: the stored config is not valid: {exc}") from None
    data_cfg = cfg.data if data is None else cfg.data.model_copy(update={"root": data})
    dev = resolve_device(device)
    num_classes, size = int(meta["num_classes"]), int(meta["image_size"])
    model: nn.Module
    if kind == "teacher":
        model = build_teacher_arch(str(meta["arch"]), num_classes=num_classes, image_size=size)
    else:
        assert isinstance(cfg, RunConfig)
        model = build_student(cfg.student, num_classes=num_classes, image_size=size)
    load_model_weights(model, checkpoint, expect={"num_classes": num_classes})
    model = freeze(model).to(dev)
    # A folder written by `stars synthesize` is evaluated as it is (labels from its folders).
    synthetic = (
        None
        if data is None
        else load_synthetic_set(data, cfg.data, num_classes=num_classes, image_size=size)
    )
    try:
        test = synthetic if synthetic is not None else build_data(data_cfg).test()
    except DataError as exc:
        raise StarsError(f"{exc} (or pass --data PATH)") from None
    if test is None:
        raise StarsError("the dataset has no test split to evaluate on")
    test = stratified_subset(test, max_images, 0)
    loader = DataLoader(test, batch_size=256)
    steps = cfg.student.T if isinstance(cfg, RunConfig) else 1
    chunk = forward_batch("auto", steps=steps, image_size=size, device=dev)
    acc = top1(model, loader, dev, chunk=chunk)
    result: dict[str, Any] = {"kind": kind, "arch": meta["arch"], "top1": acc}
    table = Table(title=f"stars evaluate {checkpoint.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("architecture", str(meta["arch"]))
    what = "synthetic images (top-1 = agreement)" if synthetic is not None else "test images"
    table.add_row(what, str(len(test)))  # type: ignore[arg-type]
    table.add_row("top-1 (%)", f"{result['top1']:.2f}")
    if kind == "student":
        stats = measure_spikes(model, (x for x, _ in split_batches(loader, chunk)), dev)
        result["spikes"] = stats.to_dict()
        table.add_row("mean firing rate", f"{stats.mean_firing_rate:.4f}")
        table.add_row("SynOps / image", f"{stats.synops:.3e}")
        table.add_row("MACs / image", f"{stats.macs:.3e}")
        table.add_row("energy / image (uJ)", f"{stats.energy_pj / 1e6:.3f}")
    else:
        cost = measure_ann(model, (3, size, size), dev)
        result["macs"] = cost.macs
        table.add_row("MACs / image", f"{cost.macs:.3e}")
        table.add_row("energy / image (uJ)", f"{cost.energy_pj / 1e6:.3f}")
    console.print(table)
    return result
