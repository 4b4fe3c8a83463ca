"""Supervised training of an ANN teacher on real images (``stars train-teacher``).

SGD with momentum (Nesterov optional), cosine / one-cycle / step schedule with warm-up,
optional label smoothing; a rich progress bar, ``metrics.jsonl``, top-1 on the test split
after each evaluation epoch; the weights as safetensors with a metadata sidecar.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor
from torch.optim import swa_utils
from torch.utils.data import DataLoader

from stars.config import TeacherTrainConfig, dump_yaml
from stars.data.datasets import build_data, stratified_subset
from stars.errors import StarsError
from stars.evaluation import top1
from stars.models.io import load_model_weights, save_model
from stars.models.teachers import build_teacher_arch
from stars.optim import build_optimizer, build_scheduler
from stars.runtime import (
    MetricsLog,
    autocast,
    make_run_dir,
    maybe_compile,
    progress_bar,
    resolve_device,
    seed_everything,
)

__all__ = ["TeacherResult", "train_teacher"]


RUN_FILES = ("config.yaml", "metrics.jsonl", "teacher.safetensors", "teacher.json", "summary.json")
"""What a train-teacher run writes into its directory."""


@dataclass(frozen=True)
class TeacherResult:
    run_dir: Path
    weights: Path
    test_top1: float | None
    seconds: float


def _images(loader: DataLoader[Any], device: torch.device, channels_last: bool) -> Iterator[Tensor]:
    """The loader's images on ``device`` (for ``update_bn``)."""
    for x, _ in loader:
        x = x.to(device)
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_teacher(
    cfg: TeacherTrainConfig, *, overwrite: bool = False, console: Console | None = None
) -> TeacherResult:
    """Train the configured teacher; returns where the weights went and the test top-1."""
    console = console or Console()
    swa = cfg.train.swa
    if swa is not None and swa.start_epoch >= cfg.train.epochs:
        raise StarsError(
            f"train.swa.start_epoch={swa.start_epoch} leaves no epoch to average "
            f"(train.epochs={cfg.train.epochs}); allowed: 0..{cfg.train.epochs - 1}"
        )
    device = resolve_device(cfg.device)
    source = build_data(cfg.data)
    train_set = stratified_subset(source.train(augment=True), cfg.train.max_train_images, cfg.seed)
    test_set = source.test() if cfg.evaluation.enabled else None
    if test_set is not None:
        test_set = stratified_subset(test_set, cfg.evaluation.max_images, 0)
    seed_everything(cfg.seed)
    model = build_teacher_arch(
        cfg.teacher.arch, num_classes=source.num_classes, image_size=source.image_size
    )
    init_meta: dict[str, Any] | None = None
    if cfg.train.init_from is not None:
        init_meta = load_model_weights(
            model,
            cfg.train.init_from,
            expect={
                "arch": cfg.teacher.arch,
                "num_classes": source.num_classes,
                "image_size": source.image_size,
            },
        )
    run = make_run_dir(cfg.output_dir, cfg.name, "train-teacher", overwrite=overwrite)
    for stale in RUN_FILES:  # an overwritten run leaves nothing of the old one behind
        (run / stale).unlink(missing_ok=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train_set,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=len(train_set) > cfg.train.batch_size,  # type: ignore[arg-type]
        num_workers=cfg.data.num_workers,
        generator=g,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    test_loader = (
        DataLoader(test_set, batch_size=cfg.evaluation.batch_size, num_workers=cfg.data.num_workers)
        if test_set is not None
        else None
    )
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = maybe_compile(model) if cfg.compile else model
    opt = build_optimizer(cfg.train.optimizer, model.parameters())
    sched = build_scheduler(
        cfg.train.schedule, opt, epochs=cfg.train.epochs, steps_per_epoch=len(loader)
    )
    averaged = swa_utils.AveragedModel(model) if swa is not None else None
    swa_sched: swa_utils.SWALR | None = None  # built when averaging starts
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and device.type == "cuda")
    start = time.time()
    acc: float | None = None
    if test_loader is None:
        console.print("[yellow]No test split configured: skipping evaluation.[/]")
    with (
        MetricsLog(run / "metrics.jsonl", tensorboard=cfg.tensorboard) as metrics,
        progress_bar(console) as bar,
    ):
        task = bar.add_task("train-teacher", total=cfg.train.epochs * len(loader), info="")
        for epoch in range(cfg.train.epochs):
            averaging = swa is not None and epoch >= swa.start_epoch
            if swa is not None and epoch == swa.start_epoch:
                if swa.anneal_epochs == 0:
                    for group in opt.param_groups:
                        group["lr"] = swa.lr
                else:  # anneals from the current rate to swa.lr, stepped once per epoch
                    swa_sched = swa_utils.SWALR(opt, swa_lr=swa.lr, anneal_epochs=swa.anneal_epochs)
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                with autocast(device, cfg.precision):
                    logits = forward(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(scaler.scale(loss))
                scaler.step(opt)
                scaler.update()
                if not averaging:
                    sched.step()
                loss_sum += float(loss.detach()) * y.numel()
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += y.numel()
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {loss_sum / seen:.3f}")
            record: dict[str, Any] = {
                "event": "train",
                "epoch": epoch + 1,
                "loss": loss_sum / max(seen, 1),
                "train_top1": 100.0 * correct / max(seen, 1),
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.time() - start,
            }
            if averaging and averaged is not None:
                averaged.update_parameters(model)
                if swa_sched is not None:
                    swa_sched.step()
            last = epoch + 1 == cfg.train.epochs
            if last and averaged is not None:
                swa_utils.update_bn(_images(loader, device, cfg.channels_last), averaged)
                model.load_state_dict(averaged.module.state_dict())
                record["swa_averaged_epochs"] = int(averaged.n_averaged)
            if test_loader is not None and (last or (epoch + 1) % cfg.evaluation.every_epochs == 0):
                acc = top1(model, test_loader, device)
                record["test_top1"] = acc
                bar.console.print(f"epoch {epoch + 1}: test top-1 {acc:.2f}%")
            metrics.write(record)
    weights = run / "teacher.safetensors"
    save_model(
        model,
        weights,
        {
            "kind": "teacher",
            "arch": cfg.teacher.arch,
            "num_classes": source.num_classes,
            "image_size": source.image_size,
            "dataset": source.name,
            "mean": list(source.mean),
            "std": list(source.std),
            "test_top1": acc,
            "epochs": cfg.train.epochs + int((init_meta or {}).get("epochs") or 0),
            "init_from": str(cfg.train.init_from) if cfg.train.init_from is not None else None,
            "swa": None if swa is None else swa.model_dump(),
            "config": cfg.model_dump(mode="json"),
        },
    )
    seconds = time.time() - start
    summary = {"weights": str(weights), "test_top1": acc, "seconds": seconds}
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return TeacherResult(run, weights, acc, seconds)
