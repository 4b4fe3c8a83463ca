"""``stars distill`` as a recipe: data-free distillation in explicit phases.

:class:`DistillRecipe` runs ``setup -> for each epoch: synthesis, KD, evaluate,
checkpoint -> finalize`` over the components :func:`stars.pipeline.build_components` makes
from a config (docs/design.md sections 2 and 6). Fast-style alternation: each epoch adds
``synthesis_steps_per_epoch`` batches to the memory bank, then runs ``kd_steps_per_epoch``
student steps on batches drawn from it. What a method asks of the loop comes from its config
(:class:`~stars.synthesis.methods.MethodConfig`): epochs without KD
(``kd_warmup_epochs``: Fast's warm-up) and synthesis up front (``synthesize_upfront``:
DeepInversion's protocol). The run directory is :mod:`stars.run_dir`.

A phase can be called on its own (a notebook stepping through a run, a test); :meth:`run`
is the whole loop (what ``stars distill`` runs). Under ``torchrun`` every rank runs the
recipe; only rank 0 writes files and prints.
"""

from __future__ import annotations

import json
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table
from torch.utils.data import DataLoader

from stars import run_dir
from stars.config import RunConfig
from stars.data.classes import class_names as dataset_class_names
from stars.distill.spikes import energy_table
from stars.distributed import (
    broadcast_object,
    gather_batches,
    gather_objects,
    init_distributed,
    max_rank_difference,
    sync_buffers,
)
from stars.errors import StarsError
from stars.models.io import save_model
from stars.pipeline import (
    Components,
    Evaluation,
    build_components,
    evaluate_student,
    save_grid,
    test_loader,
    warmup_epochs,
)
from stars.runtime import MetricsLog, progress_bar
from stars.synthesis.protocols import SynthesisStep
from stars.synthesis.synthesizers import with_bank, without_bank
from stars.tensorboard_log import log_grid

__all__ = [
    "DistillRecipe",
    "DistillResult",
    "Interrupted",
    "calibrate",
    "run_distill",
    "term_gradients",
]


class Interrupted(Exception):
    """SIGINT or SIGTERM during a run (the last checkpoint is kept)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class DistillResult:
    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Counters:
    """What the loop carries from epoch to epoch (checkpointed as ``extra``)."""

    seconds_before: float = 0.0
    bad_synthesis: int = 0
    synthesis_in_a_row: int = 0
    teacher_top1: float | None = None


class DistillRecipe:
    """Distillation of one config, phase by phase.

    Args:
        cfg: the run config (ignored with ``resume``: the run's saved config is used).
        resume: a run directory to continue from its checkpoint.
        overwrite: replace an existing non-empty run directory.
        console: where progress and the summary go (quiet on ranks other than 0).
        show_progress: progress bars.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: Path | None = None,
        overwrite: bool = False,
        console: Console | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg = run_dir.resumed_config(resume) if resume is not None else cfg
        self.resume = resume
        self.overwrite = overwrite
        self.console = console or Console()
        self.show_progress = show_progress
        self.directory: Path = resume if resume is not None else Path()
        """The run directory (:mod:`stars.run_dir`)."""
        self.start_epoch = 0
        self.counters = _Counters()
        self.last_eval: Evaluation | None = None
        self.loader: DataLoader[Any] | None = None
        self._t0 = time.time()

    # ------------------------------------------------------------------------- phases

    def setup(self) -> Components:
        """Build the components (before any file is written: bad input leaves nothing),
        create or reopen the run directory, restore a checkpoint, log the calibration."""
        cfg = self.cfg
        info = init_distributed(cfg.device)
        self.main = info.is_main
        if not self.main:
            self.console, self.show_progress = Console(quiet=True), False
        self.comp = comp = build_components(cfg, info)
        comp.synthesizer.store = not info.enabled
        if self.resume is None:
            if self.main:
                self.directory = run_dir.create(cfg, overwrite=self.overwrite)
            if info.enabled:
                shared = broadcast_object(str(self.directory) if self.main else None, info)
                self.directory = Path(shared)
        self.loader = test_loader(cfg, self.console) if self.main else None
        if self.resume is not None:
            self.start_epoch, extra = _restore(comp, run_dir.load_checkpoint(self.directory))
            if self.main:
                run_dir.trim_metrics(self.directory, self.start_epoch)
            self.console.print(
                f"Resuming {self.directory} after epoch {self.start_epoch}/{cfg.distill.epochs}."
            )
            self.counters = _Counters(
                seconds_before=float(extra.get("seconds", 0.0)),
                bad_synthesis=int(extra.get("skipped_synthesis_steps", 0)),
                synthesis_in_a_row=int(extra.get("synthesis_in_a_row", 0)),
                teacher_top1=extra.get("teacher_top1"),
            )
        self._t0 = time.time()
        if self.resume is None and self.main:
            log = self.directory / run_dir.METRICS
            with MetricsLog(log, tensorboard=cfg.tensorboard) as metrics:
                metrics.write({"event": "calibration", "epoch": 0} | calibrate(comp))
        return comp

    def synthesis_steps(self, epoch: int) -> int:
        """Synthesis steps of 0-based ``epoch`` (all of them at epoch 0 when the method
        synthesizes up front)."""
        d = self.cfg.distill
        if self.cfg.synthesis.synthesize_upfront:
            return d.epochs * d.synthesis_steps_per_epoch if epoch == 0 else 0
        return d.synthesis_steps_per_epoch

    def kd_steps(self, epoch: int) -> int:
        """KD steps of 0-based ``epoch`` (none during the method's KD warm-up)."""
        return self.cfg.distill.kd_steps_per_epoch if epoch >= warmup_epochs(self.cfg) else 0

    def synthesis(
        self, epoch: int, on_step: Callable[[SynthesisStep], None] | None = None
    ) -> dict[str, list[float]]:
        """The epoch's synthesis steps; each term's values by name. ``on_step(step)`` is
        called after each (the progress bar)."""
        comp, d = self.comp, self.cfg.distill
        c = self.counters
        comp.synthesizer.set_epoch(epoch)
        syn: dict[str, list[float]] = defaultdict(list)
        for _ in range(self.synthesis_steps(epoch)):
            step = comp.synthesizer.synthesize(comp.student)
            if on_step is not None:
                on_step(step)
            if comp.info.enabled:
                step = _share_batches(comp, step)
            if not step.finite:
                c.bad_synthesis += 1
                c.synthesis_in_a_row += 1
                if c.synthesis_in_a_row >= d.max_bad_steps:
                    raise StarsError(
                        f"{c.synthesis_in_a_row} non-finite synthesis steps in a row at epoch "
                        f"{epoch + 1}; the run stops. The checkpoint of epoch {epoch} "
                        f"is in {self.directory}. Lower the synthesis learning rate or the loss "
                        "weights, then --resume."
                    )
                continue
            c.synthesis_in_a_row = 0
            for k, v in step.losses.items():
                syn[k].append(v)
        return syn

    def kd(
        self, epoch: int, on_step: Callable[[Mapping[str, float]], None] | None = None
    ) -> dict[str, list[float]]:
        """The epoch's KD steps on batches from the memory bank; each part of the student's
        loss by name. ``on_step(parts)`` is called after each."""
        comp, d = self.comp, self.cfg.distill
        kd: dict[str, list[float]] = defaultdict(list)
        steps = self.kd_steps(epoch)
        if steps and len(comp.synthesizer.bank) == 0:
            raise StarsError(
                f"the memory bank is empty at epoch {epoch + 1}: no synthesized batch "
                "was finite (or distill.synthesis_steps_per_epoch is 0)"
            )
        for _ in range(steps):
            batch = comp.synthesizer.sample(d.batch_size // comp.info.world)
            out = comp.distiller.step(batch)
            for k, v in out.parts.items():
                kd[k].append(v)
            if on_step is not None:
                on_step(out.parts)
            if comp.distiller.bad_in_a_row >= d.max_bad_steps:
                raise StarsError(
                    f"{comp.distiller.bad_in_a_row} non-finite KD steps in a row at "
                    f"epoch {epoch + 1}; the run stops. The checkpoint of epoch "
                    f"{epoch} is in {self.directory}. Lower distill.optimizer.lr or use "
                    "precision fp32, then --resume."
                )
        sync_buffers(comp.student, comp.info)
        return kd

    def epoch_record(
        self, epoch: int, syn: Mapping[str, list[float]], kd: Mapping[str, list[float]]
    ) -> dict[str, Any]:
        """The metrics line of 0-based ``epoch``."""
        comp = self.comp
        record: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1}
        record |= _means(syn, "synthesis") | _means(kd, "kd")
        record["lr"] = comp.distiller.optimizer.param_groups[0]["lr"]
        record["bank_size"] = len(comp.synthesizer.bank)
        record["skipped_kd_steps"] = comp.distiller.skipped
        record["skipped_synthesis_steps"] = self.counters.bad_synthesis
        record["seconds"] = self.seconds()
        return record

    def evaluate(self, epoch: int) -> Evaluation | None:
        """Top-1, firing and energy on the evaluation split after 0-based ``epoch`` when it
        is due (every ``evaluation.every_epochs`` and at the end); None otherwise."""
        last = epoch + 1 == self.cfg.distill.epochs
        every = self.cfg.evaluation.every_epochs
        if self.loader is None or not (last or (epoch + 1) % every == 0):
            return None
        ev = evaluate_student(self.comp, self.loader, teacher_top1=self.counters.teacher_top1)
        self.counters.teacher_top1 = ev.teacher_top1
        self.last_eval = ev
        return ev

    def checkpoint(self, epoch: int) -> None:
        """The resumable state after 0-based ``epoch`` (a collective under torchrun: every
        rank calls it; rank 0 writes it)."""
        c = self.counters
        extra = {
            "seconds": self.seconds(),
            "teacher_top1": c.teacher_top1,
            "skipped_synthesis_steps": c.bad_synthesis,
            "synthesis_in_a_row": c.synthesis_in_a_row,
        }
        state = _state(self.comp, epoch + 1, extra)
        if self.main:
            run_dir.save_checkpoint(self.directory, state)

    def finalize(self) -> DistillResult:
        """The end-of-run term gradients, the student file, the grid and the summary."""
        comp, cfg = self.comp, self.cfg
        d = cfg.distill
        seconds = self.seconds()
        info = comp.info
        rank_difference = max_rank_difference(comp.student, info) if info.enabled else 0.0
        if not self.main:
            return DistillResult(self.directory, {})
        run = self.directory
        with MetricsLog(run / run_dir.METRICS, tensorboard=cfg.tensorboard) as metrics:
            metrics.write({"event": "term_gradients", "epoch": d.epochs} | term_gradients(comp))
        geo = comp.geometry
        last_eval = self.last_eval
        s_acc = None if last_eval is None else last_eval.student_top1
        save_model(
            comp.student,
            run / run_dir.STUDENT,
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
        _bank_grid(comp, run / run_dir.GRID)
        if cfg.tensorboard:
            log_grid(run, d.epochs)
        summary: dict[str, Any] = {
            "run_dir": str(run),
            "epochs": d.epochs,
            "student_top1": s_acc,
            "teacher_top1": None if last_eval is None else last_eval.teacher_top1,
            "seconds": seconds,
            "skipped_kd_steps": comp.distiller.skipped,
            "skipped_synthesis_steps": self.counters.bad_synthesis,
            "processes": info.world,
            "max_rank_difference": rank_difference,
            "synthesis": cfg.synthesis.kind,
            "stars": cfg.stars.model_dump(mode="json"),
        }
        if last_eval is not None:
            summary["evaluation"] = last_eval.record()
        else:
            summary["evaluation"] = None
            self.console.print(
                "[yellow]No evaluation was run (no test data): accuracy is unknown.[/]"
            )
        (run / run_dir.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        self.console.print(_summary_table(summary, last_eval))
        self.console.print(f"Run directory: {run}")
        return DistillResult(run, summary)

    # ------------------------------------------------------------------------- the loop

    def seconds(self) -> float:
        """Wall time of the run so far, over every session of it."""
        return self.counters.seconds_before + time.time() - self._t0

    def run(self) -> DistillResult:
        """``setup``, every remaining epoch (synthesis, KD, metrics, evaluation, checkpoint),
        ``finalize``; SIGINT/SIGTERM stop after keeping the last checkpoint."""
        self.setup()
        cfg, d = self.cfg, self.cfg.distill
        try:
            with (
                _signals_raise(),
                MetricsLog(
                    self.directory / run_dir.METRICS if self.main else None,
                    tensorboard=cfg.tensorboard,
                    resume_after=None if self.resume is None else self.start_epoch,
                ) as metrics,
                progress_bar(self.console if self.show_progress else Console(quiet=True)) as bar,
            ):
                epochs = range(self.start_epoch, d.epochs)
                s_task = bar.add_task(
                    "synthesis", total=sum(self.synthesis_steps(e) for e in epochs), info=""
                )
                k_task = bar.add_task("KD", total=sum(self.kd_steps(e) for e in epochs), info="")
                for epoch in epochs:
                    syn = self.synthesis(epoch, _synthesis_bar(bar, s_task))
                    kd = self.kd(epoch, _kd_bar(bar, k_task))
                    metrics.write(self.epoch_record(epoch, syn, kd))
                    ev = self.evaluate(epoch)
                    if ev is not None:
                        metrics.write({"event": "eval", "epoch": epoch + 1} | ev.record())
                        bar.console.print(
                            f"epoch {epoch + 1}: student top-1 {ev.student_top1:.2f}% "
                            f"(teacher {ev.teacher_top1:.2f}%)"
                        )
                    self.checkpoint(epoch)
        except Interrupted as exc:
            done = run_dir.checkpoint_epoch(self.directory)
            self.console.print(
                f"[yellow]{exc} received: stopped. The checkpoint after epoch {done} is kept; "
                f"continue with `stars distill CONFIG --resume {self.directory}`.[/]"
            )
            raise
        return self.finalize()


def run_distill(
    cfg: RunConfig,
    *,
    resume: Path | None = None,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> DistillResult:
    """Run (or resume) a distillation; returns the run directory and the summary
    (:meth:`DistillRecipe.run`)."""
    recipe = DistillRecipe(
        cfg, resume=resume, overwrite=overwrite, console=console, show_progress=show_progress
    )
    return recipe.run()


def _synthesis_bar(bar: Progress, task: TaskID) -> Callable[[SynthesisStep], None]:
    """The synthesis phase's progress callback: one step, showing the BN term."""

    def on_step(step: SynthesisStep) -> None:
        bar.update(task, advance=1, info=f"bn {step.losses.get('bn', 0):.2f}")

    return on_step


def _kd_bar(bar: Progress, task: TaskID) -> Callable[[Mapping[str, float]], None]:
    """The KD phase's progress callback: one step, showing the student's loss."""

    def on_step(parts: Mapping[str, float]) -> None:
        bar.update(task, advance=1, info=f"loss {parts['loss']:.3f}")

    return on_step


# ----------------------------------------------------------------------------- checkpoints


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
        own = {"synthesizer": without_bank(synth), "distiller": comp.distiller.state_dict()}
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
        synth = with_bank(own["synthesizer"], synth)
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


# ----------------------------------------------------------------------------- measurements


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


# ----------------------------------------------------------------------------- outputs


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
