"""The run directory of ``stars distill``: its files, its creation and its checkpoint.

A run directory holds:

- ``config.yaml``: the resolved config (``--resume`` reads it back);
- ``metrics.jsonl``: one JSON record per line (calibration, epochs, evaluations, the end-of-run
  term gradients), and ``tensorboard/`` with the same scalars when asked;
- ``checkpoint.safetensors``: written atomically after every epoch; ``--resume`` continues
  from it and ends with the same metrics as an uninterrupted run;
- ``student.safetensors`` + ``student.json``, ``synthetic_grid.png`` and ``summary.json`` at
  the end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stars.config import RunConfig, dump_yaml, load_config
from stars.distill.checkpoint import load_state, save_state
from stars.errors import StarsError
from stars.runtime import make_run_dir

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "GRID",
    "METRICS",
    "STUDENT",
    "SUMMARY",
    "checkpoint_epoch",
    "create",
    "load_checkpoint",
    "resumed_config",
    "save_checkpoint",
    "trim_metrics",
]

CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
STUDENT = "student.safetensors"
GRID = "synthetic_grid.png"


def create(cfg: RunConfig, *, overwrite: bool = False) -> Path:
    """Make the run directory of ``cfg`` (refusing a non-empty one unless ``overwrite``),
    write the resolved config, and remove what a replaced run left there."""
    run = make_run_dir(cfg.output_dir, cfg.name, "distill", overwrite=overwrite)
    (run / CONFIG).write_text(dump_yaml(cfg))
    for stale in (CHECKPOINT, METRICS, SUMMARY):
        (run / stale).unlink(missing_ok=True)
    return run


def resumed_config(run: Path) -> RunConfig:
    """The config of the run to ``--resume`` in ``run``.

    Raises:
        StarsError: there is no checkpoint to resume (or the saved config is invalid).
    """
    if not (run / CHECKPOINT).is_file():
        raise StarsError(f"--resume {run}: no {CHECKPOINT} there (nothing to resume)")
    return load_config(run / CONFIG)


def save_checkpoint(run: Path, state: Mapping[str, Any]) -> None:
    """Write the checkpoint after ``state["epoch"]`` (atomically: an interrupted write keeps
    the previous one).

    Raises:
        StarsError: it cannot be written (disk full, permissions), saying what to do.
    """
    epoch = int(state["epoch"])
    try:
        save_state(run / CHECKPOINT, dict(state))
    except OSError as exc:
        raise StarsError(
            f"cannot write the checkpoint of epoch {epoch} to {run}: "
            f"{exc.strerror or exc}. The previous checkpoint (epoch {epoch - 1}) is "
            "intact; free space or fix permissions, then --resume."
        ) from None


def load_checkpoint(run: Path) -> dict[str, Any]:
    """The checkpoint's state."""
    state: dict[str, Any] = load_state(run / CHECKPOINT)
    return state


def checkpoint_epoch(run: Path) -> int:
    """The epoch the checkpoint was written after (0 without one)."""
    return int(load_checkpoint(run)["epoch"]) if (run / CHECKPOINT).exists() else 0


def trim_metrics(run: Path, epochs_done: int) -> None:
    """Drop the metrics records of epochs after the checkpoint (a killed run may have logged
    them), and a line cut by the kill."""
    path = run / METRICS
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("epoch", 0)) <= epochs_done:
            keep.append(line)
    path.write_text("".join(f"{line}\n" for line in keep))
