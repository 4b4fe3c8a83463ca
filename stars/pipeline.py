"""Builds the components a config describes and runs data-free distillation.

``config -> (teacher, student, synthesizer, distiller) -> epochs of synthesis + KD ->
evaluation -> run directory`` (docs/design.md sections 2 and 6). Fast-style alternation: each
epoch adds ``synthesis_steps_per_epoch`` batches to the memory bank, then runs
``kd_steps_per_epoch`` student steps on batches drawn from it (no KD during Fast's warm-up
epochs). DeepInversion synthesizes every batch first, then distills (unless
``synthesis.synthesize_first`` is false: then it alternates as Fast does).

The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoint.
safetensors`` (written atomically every epoch; ``--resume`` continues from it and ends
with the same metrics as an uninterrupted run), ``student.safetensors`` + ``student.json``,
``synthetic_grid.png``, ``summary.json``.
"""

from __future__ import annotations

import json
import signal
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from stars.config import (
    CifarData,
    ImageFolderData,
    RunConfig,
    dump_yaml,
    load_config,
)
from stars.data.classes import class_names as dataset_class_names
from stars.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DataError,
    build_data,
    stratified_subset,
)
from stars.distill.checkpoint import load_state, save_state
from stars.distill.distiller import KDDistiller
from stars.distill.protocols import Distiller
from stars.distill.spikes import ANNCost, SpikeStats, energy_table, measure_ann, measure_spikes
from stars.distributed import (
    DistInfo,
    broadcast_object,
    ddp_features,
    gather_batches,
    gather_objects,
    init_distributed,
    max_rank_difference,
    sync_buffers,
)
from stars.errors import StarsError
from stars.evaluation import top1
from stars.models.factory import build_teacher
from stars.models.io import save_model
from stars.models.protocols import SpikingStudent, Teacher
from stars.models.students import build_student
from stars.optim import build_optimizer, build_scheduler
from stars.runtime import (
    MetricsLog,
    make_run_dir,
    maybe_compile,
    progress_bar,
    resolve_device,
    seed_everything,
)
from stars.synthesis.export import save_labelled_grid
from stars.synthesis.factory import build_synthesizer
from stars.synthesis.priors import extract_bn_prior
from stars.synthesis.protocols import SynthesisStep, Synthesizer
from stars.synthesis.spike_tar import SpikeTailTerm
from stars.synthesis.synthesizers import SynthesizerBase
from stars.tensorboard_log import log_grid

__all__ = [
    "Components",
    "DataGeometry",
    "DistillResult",
    "Interrupted",
    "build_components",
    "calibrate",
    "data_geometry",
    "run_distill",
    "save_grid",
    "synthesizer_for",
    "term_gradients",
]

CHECKPOINT = "checkpoint.safetensors"


class Interrupted(Exception):
    """SIGINT / SIGTERM during a run: the last epoch checkpoint is kept."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    if cfg.channels_last:
        ann = ann.to(memory_format=torch.channels_last)
        snn = snn.to(memory_format=torch.channels_last)
    teacher: Teacher = ann
    student: SpikingStudent = snn
    if cfg.compile:
        teacher, student = maybe_compile(ann), maybe_compile(snn)
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


@dataclass
class DistillResult:
    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- evaluation

VAL_SEED = 12345
"""Seed of the fixed val subset of the training split (``evaluation.split: val``)."""


def _test_loader(cfg: RunConfig, console: Console) -> DataLoader[Any] | None:
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


def _images_only(loader: DataLoader[Any], limit: int) -> Iterator[Tensor]:
    seen = 0
    for x, _ in loader:
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
    s_acc = top1(comp.student, loader, comp.device)
    t_acc = teacher_top1 if teacher_top1 is not None else top1(comp.teacher, loader, comp.device)
    spikes = measure_spikes(comp.student, _images_only(loader, 512), comp.device)
    g = comp.geometry
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


def _bank_grid(comp: Components, path: Path) -> None:
    bank = comp.synthesizer.bank
    if len(bank) == 0:
        return
    save_grid(bank.pixels(), bank.labels(), path, class_names=dataset_class_names(comp.cfg.data))


def _summary_table(summary: Mapping[str, Any], evaluation: Evaluation | None) -> Table:
    table = Table(title="stars distill")
    table.add_column("metric")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    if evaluation is not None:
        table.add_row(
            "top-1 (%)", f"{evaluation.teacher_top1:.2f}", f"{evaluation.student_top1:.2f}"
        )
        for name, t, s in energy_table(evaluation.spikes, evaluation.teacher_cost):
            table.add_row(name, t, s)
    table.add_row("wall time (min)", "", f"{summary['seconds'] / 60:.1f}")
    table.add_row("skipped KD steps", "", str(summary["skipped_kd_steps"]))
    return table


# ----------------------------------------------------------------------------- checkpoints


def _without_bank(state: dict[str, Any]) -> dict[str, Any]:
    ctx = dict(state["ctx"])
    ctx.pop("bank")
    return {**state, "ctx": ctx}


def _state(comp: Components, epoch: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The resumable state (a collective under torchrun: every rank must call it)."""
    synth = comp.synthesizer.state_dict()
    state: dict[str, Any] = {
        "epoch": epoch,
        "world": comp.info.world,
        "student": comp.student.state_dict(),
        "synthesizer": synth,
        "distiller": comp.distiller.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "extra": dict(extra),
    }
    if comp.info.enabled:
        # Each rank has its own generator, optimizers and random streams; the banks are equal.
        own = {"synthesizer": _without_bank(synth), "distiller": comp.distiller.state_dict()}
        state["ranks"] = gather_objects(own, comp.info)
    return state


def _restore(comp: Components, state: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    info = comp.info
    if int(state.get("world", 1)) != info.world:
        raise StarsError(
            f"the checkpoint was written by {state.get('world', 1)} process(es); resume it with "
            f"the same number (this run has {info.world})"
        )
    synth, distiller = state["synthesizer"], state["distiller"]
    if info.enabled and info.rank > 0:
        own = state["ranks"][info.rank]
        synth = {
            **own["synthesizer"],
            "ctx": {**own["synthesizer"]["ctx"], "bank": synth["ctx"]["bank"]},
        }
        distiller = own["distiller"]
    comp.student.load_state_dict(state["student"])
    comp.synthesizer.load_state_dict(synth)
    comp.distiller.load_state_dict(distiller)
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), dict(state.get("extra") or {})


def _share_batches(comp: Components, step: SynthesisStep) -> SynthesisStep:
    """Data-parallel synthesis: add every rank's share, in rank order, to this rank's bank.

    The step counts as finite only when every share is (so that all ranks agree)."""
    shares = gather_batches(step.images, step.labels, step.finite, comp.info)
    for share in shares:
        if share is not None:
            comp.synthesizer.bank.add(*share)
    return replace(step, finite=all(s is not None for s in shares))


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """Drop records of epochs after the checkpoint (a killed run may have logged them)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if int(rec.get("epoch", 0)) <= epochs_done:
            keep.append(line)
    path.write_text("".join(f"{line}\n" for line in keep))


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM raise :class:`Interrupted` inside the block (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- the run


def _norm_record(norms: Mapping[str, float]) -> dict[str, float]:
    """``grad_norm/<term>`` and ``ratio/<term>`` (over the BN term's norm) for a metrics line."""
    out = {f"grad_norm/{k}": v for k, v in norms.items()}
    bn = norms.get("bn", 0.0)
    if bn > 0:
        out |= {f"ratio/{k}": v / bn for k, v in norms.items() if k != "bn"}
    return out


def calibrate(comp: Components, n: int = 32) -> dict[str, float]:
    """Gradient norm of each synthesis term on the images at the start of synthesis.

    Images are N(0, 1) in the normalized space (DeepInversion's initialization), drawn from
    a generator of their own so that the run's random streams are untouched. STARS terms
    whose weight is 0 are measured at weight 1. ``ratio/<term>`` is the term's gradient norm
    over the BN term's: the number to read when choosing ``stars.*.weight`` (docs/design.md
    section 4 asks that each STARS term be a stated fraction of the BN term at the start).
    """
    g = comp.geometry
    gen = torch.Generator().manual_seed(comp.cfg.seed + 7)
    x = torch.randn(n, 3, g.image_size, g.image_size, generator=gen).to(comp.device)
    y = (torch.arange(n) % g.num_classes).to(comp.device)
    return _norm_record(comp.synthesizer.objective.grad_norms(x, y, comp.student))


def term_gradients(comp: Components, n: int = 32) -> dict[str, float]:
    """:func:`calibrate`'s measurement at the end of a run, on ``n`` memory-bank images with
    the teacher's labels and the trained student: does each term still reach the images,
    and how strongly against BN (a stalled term reads 0). Its own random stream."""
    bank = comp.synthesizer.bank
    if len(bank) == 0:
        return {}
    gen = torch.Generator().manual_seed(comp.cfg.seed + 11)
    x = bank.sample(n, generator=gen).to(comp.device)
    with torch.no_grad():
        y = comp.teacher(x).argmax(1)
    return _norm_record(comp.synthesizer.objective.grad_norms(x, y, comp.student))


def _means(acc: Mapping[str, list[float]], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": sum(v) / len(v) for k, v in acc.items() if v}


def run_distill(
    cfg: RunConfig,
    *,
    resume: Path | None = None,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> DistillResult:
    """Run (or resume) a distillation; returns the run directory and the summary.

    Under ``torchrun`` every rank calls this; only rank 0 writes files and prints.
    """
    console = console or Console()
    if resume is not None:
        saved = resume / "config.yaml"
        if not (resume / CHECKPOINT).is_file():
            raise StarsError(f"--resume {resume}: no {CHECKPOINT} there (nothing to resume)")
        cfg = load_config(saved)
        run = resume
    info = init_distributed(cfg.device)
    main = info.is_main
    if not main:
        console, show_progress = Console(quiet=True), False
    comp = build_components(cfg, info)  # before any file is written: bad input leaves nothing
    comp.synthesizer.store = not info.enabled
    if resume is None:
        if main:
            run = make_run_dir(cfg.output_dir, cfg.name, "distill", overwrite=overwrite)
            (run / "config.yaml").write_text(dump_yaml(cfg))
            for stale in (CHECKPOINT, "metrics.jsonl", "summary.json"):
                (run / stale).unlink(missing_ok=True)
        if info.enabled:
            run = Path(broadcast_object(str(run) if main else None, info))

    loader = _test_loader(cfg, console) if main else None
    start_epoch, extra = 0, dict[str, Any]()
    if resume is not None:
        start_epoch, extra = _restore(comp, load_state(run / CHECKPOINT))
        if main:
            _trim_metrics(run / "metrics.jsonl", start_epoch)
        console.print(f"Resuming {run} after epoch {start_epoch}/{cfg.distill.epochs}.")
    elapsed_before = float(extra.get("seconds", 0.0))
    bad_synth = int(extra.get("skipped_synthesis_steps", 0))
    synth_in_a_row = int(extra.get("synthesis_in_a_row", 0))
    teacher_top1: float | None = extra.get("teacher_top1")
    t0 = time.time()
    d = cfg.distill
    upfront = cfg.synthesis.synthesize_upfront
    warm = warmup_epochs(cfg)
    last_eval: Evaluation | None = None

    def n_synth(epoch: int) -> int:
        if upfront:
            return d.epochs * d.synthesis_steps_per_epoch if epoch == 0 else 0
        return d.synthesis_steps_per_epoch

    if resume is None and main:
        with MetricsLog(run / "metrics.jsonl", tensorboard=cfg.tensorboard) as metrics:
            metrics.write({"event": "calibration", "epoch": 0} | calibrate(comp))
    try:
        with (
            _signals_raise(),
            MetricsLog(
                run / "metrics.jsonl" if main else None,
                tensorboard=cfg.tensorboard,
                resume_after=None if resume is None else start_epoch,
            ) as metrics,
            progress_bar(console if show_progress else Console(quiet=True)) as bar,
        ):
            total_s = sum(n_synth(e) for e in range(start_epoch, d.epochs))
            total_k = sum(d.kd_steps_per_epoch for e in range(max(start_epoch, warm), d.epochs))
            s_task = bar.add_task("synthesis", total=total_s, info="")
            k_task = bar.add_task("KD", total=total_k, info="")
            for epoch in range(start_epoch, d.epochs):
                comp.synthesizer.set_epoch(epoch)
                syn: dict[str, list[float]] = defaultdict(list)
                for _ in range(n_synth(epoch)):
                    step = comp.synthesizer.synthesize(comp.student)
                    bar.update(s_task, advance=1, info=f"bn {step.losses.get('bn', 0):.2f}")
                    if info.enabled:
                        step = _share_batches(comp, step)
                    if not step.finite:
                        bad_synth += 1
                        synth_in_a_row += 1
                        if synth_in_a_row >= d.max_bad_steps:
                            raise StarsError(
                                f"{synth_in_a_row} non-finite synthesis steps in a row at epoch "
                                f"{epoch + 1}; the run stops. The checkpoint of epoch {epoch} "
                                f"is in {run}. Lower the synthesis learning rate or the loss "
                                "weights, then --resume."
                            )
                        continue
                    synth_in_a_row = 0
                    for k, v in step.losses.items():
                        syn[k].append(v)
                kd: dict[str, list[float]] = defaultdict(list)
                if epoch >= warm and d.kd_steps_per_epoch and len(comp.synthesizer.bank) == 0:
                    raise StarsError(
                        f"the memory bank is empty at epoch {epoch + 1}: no synthesized batch "
                        "was finite (or distill.synthesis_steps_per_epoch is 0)"
                    )
                if epoch >= warm:
                    for _ in range(d.kd_steps_per_epoch):
                        batch = comp.synthesizer.sample(d.batch_size // info.world)
                        out = comp.distiller.step(batch)
                        for k, v in out.parts.items():
                            kd[k].append(v)
                        bar.update(k_task, advance=1, info=f"loss {out.parts['loss']:.3f}")
                        if comp.distiller.bad_in_a_row >= d.max_bad_steps:
                            raise StarsError(
                                f"{comp.distiller.bad_in_a_row} non-finite KD steps in a row at "
                                f"epoch {epoch + 1}; the run stops. The checkpoint of epoch "
                                f"{epoch} is in {run}. Lower distill.optimizer.lr or use "
                                "precision fp32, then --resume."
                            )
                sync_buffers(comp.student, info)
                record: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1}
                record |= _means(syn, "synthesis") | _means(kd, "kd")
                record["lr"] = comp.distiller.optimizer.param_groups[0]["lr"]
                record["bank_size"] = len(comp.synthesizer.bank)
                record["skipped_kd_steps"] = comp.distiller.skipped
                record["skipped_synthesis_steps"] = bad_synth
                record["seconds"] = elapsed_before + time.time() - t0
                metrics.write(record)
                last = epoch + 1 == d.epochs
                if loader is not None and (last or (epoch + 1) % cfg.evaluation.every_epochs == 0):
                    last_eval = evaluate_student(comp, loader, teacher_top1=teacher_top1)
                    teacher_top1 = last_eval.teacher_top1
                    metrics.write({"event": "eval", "epoch": epoch + 1} | last_eval.record())
                    bar.console.print(
                        f"epoch {epoch + 1}: student top-1 {last_eval.student_top1:.2f}% "
                        f"(teacher {last_eval.teacher_top1:.2f}%)"
                    )
                extra = {
                    "seconds": elapsed_before + time.time() - t0,
                    "teacher_top1": teacher_top1,
                    "skipped_synthesis_steps": bad_synth,
                    "synthesis_in_a_row": synth_in_a_row,
                }
                state = _state(comp, epoch + 1, extra)
                if not main:
                    continue
                try:
                    save_state(run / CHECKPOINT, state)
                except OSError as exc:
                    raise StarsError(
                        f"cannot write the checkpoint of epoch {epoch + 1} to {run}: "
                        f"{exc.strerror or exc}. The previous checkpoint (epoch {epoch}) is "
                        "intact; free space or fix permissions, then --resume."
                    ) from None
    except Interrupted as exc:
        done = int(load_state(run / CHECKPOINT)["epoch"]) if (run / CHECKPOINT).exists() else 0
        console.print(
            f"[yellow]{exc} received: stopped. The checkpoint after epoch {done} is kept; "
            f"continue with `stars distill CONFIG --resume {run}`.[/]"
        )
        raise

    seconds = elapsed_before + time.time() - t0
    rank_difference = max_rank_difference(comp.student, info) if info.enabled else 0.0
    if not main:
        return DistillResult(run, {})
    with MetricsLog(run / "metrics.jsonl", tensorboard=cfg.tensorboard) as metrics:
        metrics.write({"event": "term_gradients", "epoch": d.epochs} | term_gradients(comp))
    geo = comp.geometry
    s_acc = None if last_eval is None else last_eval.student_top1
    save_model(
        comp.student,
        run / "student.safetensors",
        {
            "kind": "student",
            "arch": cfg.student.arch,
            "T": cfg.student.T,
            "neuron": cfg.student.neuron.model_dump(mode="json"),
            "num_classes": geo.num_classes,
            "image_size": geo.image_size,
            "dataset": geo.name,
            "mean": list(geo.mean),
            "std": list(geo.std),
            "test_top1": s_acc,
            "config": cfg.model_dump(mode="json"),
        },
    )
    _bank_grid(comp, run / "synthetic_grid.png")
    if cfg.tensorboard:
        log_grid(run, d.epochs)
    summary: dict[str, Any] = {
        "run_dir": str(run),
        "epochs": d.epochs,
        "student_top1": s_acc,
        "teacher_top1": None if last_eval is None else last_eval.teacher_top1,
        "seconds": seconds,
        "skipped_kd_steps": comp.distiller.skipped,
        "skipped_synthesis_steps": bad_synth,
        "processes": info.world,
        "max_rank_difference": rank_difference,
        "synthesis": cfg.synthesis.kind,
        "stars": cfg.stars.model_dump(mode="json"),
    }
    if last_eval is not None:
        summary["evaluation"] = last_eval.record()
    else:
        summary["evaluation"] = None
        console.print("[yellow]No evaluation was run (no test data): accuracy is unknown.[/]")
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(_summary_table(summary, last_eval))
    console.print(f"Run directory: {run}")
    return DistillResult(run, summary)
