"""TensorBoard events beside ``metrics.jsonl``: the same scalars, plus the synthetic grid.

With ``tensorboard: true`` in a run config, every record :class:`stars.runtime.MetricsLog`
writes to ``RUN/metrics.jsonl`` also goes to ``RUN/tensorboard/`` (``tensorboard --logdir
RUN/tensorboard``), through ``torch.utils.tensorboard`` (the ``tensorboard`` package comes
with spikingjelly):

- each number of a record is a scalar tagged ``"{event}/{key}"`` at step ``record["epoch"]``
  (``epoch/kd/loss``, ``eval/student_top1``, ``calibration/grad_norm/bn``, ``train/loss``);
  a nested mapping adds its keys to the tag, a list its indices; strings, booleans and nulls
  are not scalars and are left out. TensorBoard stores scalars as float32;
- :func:`log_image` adds a PNG (``stars distill`` adds ``synthetic_grid.png`` as
  ``synthetic_grid`` at the last epoch).

A run that starts a fresh ``metrics.jsonl`` (a new or ``--overwrite``-n run directory) also
starts a fresh ``tensorboard/`` (event files of the replaced run are removed); a resumed run
drops, in TensorBoard's view, what the interrupted session logged after the checkpoint (a
``purge_step``), as ``--resume`` drops it from ``metrics.jsonl``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stars.errors import StarsError

__all__ = ["TB_DIR", "TensorBoardLog", "log_grid", "log_image", "scalars"]

TB_DIR = "tensorboard"
"""The event folder's name inside a run directory."""


def scalars(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every number of a metrics record (see the module docstring)."""
    event = str(record.get("event", "metrics"))

    def walk(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, int | float):
            yield prefix, float(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                yield from walk(f"{prefix}/{k}", v)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                yield from walk(f"{prefix}/{i}", v)

    for key, value in record.items():
        if key not in ("event", "epoch"):
            yield from walk(f"{event}/{key}", value)


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # pragma: no cover - tensorboard comes with spikingjelly
        raise StarsError(
            f"tensorboard: true needs the tensorboard package ({exc}); `pip install tensorboard`"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """One event file in ``logdir`` for the scalars of metrics records.

    Args:
        logdir: the event folder (``RUN/tensorboard``).
        fresh: remove the event files already there (their run was replaced).
        resume_after: the epoch a resumed run continues after; TensorBoard then ignores what
            earlier sessions logged at later steps.
    """

    def __init__(
        self, logdir: Path, *, fresh: bool = False, resume_after: int | None = None
    ) -> None:
        writer_cls = _summary_writer()
        if fresh and logdir.is_dir():
            for stale in logdir.glob("events.out.tfevents.*"):
                stale.unlink()
        purge = None if resume_after is None else resume_after + 1
        self.logdir = logdir
        self._writer = writer_cls(log_dir=str(logdir), purge_step=purge)

    def write(self, record: Mapping[str, Any]) -> None:
        """Add every number of ``record`` at step ``record["epoch"]`` and flush."""
        step = int(record.get("epoch", 0))
        for tag, value in scalars(record):
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def log_image(logdir: Path, tag: str, png: Path, step: int) -> None:
    """Add the image in ``png`` to the event folder ``logdir`` under ``tag`` at ``step``."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as img:
        pixels = np.asarray(img.convert("RGB"))  # [H, W, 3] uint8
    writer = _summary_writer()(log_dir=str(logdir))
    try:
        writer.add_image(tag, pixels, step, dataformats="HWC")
    finally:
        writer.close()


def log_grid(run: Path, step: int, name: str = "synthetic_grid.png") -> None:
    """Add ``run/name`` (when it exists) to ``run/tensorboard`` as ``synthetic_grid``."""
    if (run / name).is_file():
        log_image(run / TB_DIR, Path(name).stem, run / name, step)
