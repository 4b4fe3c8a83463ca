"""The tiny end-to-end run config the pipeline-level tests start from, and its metrics.

One place for the shape (ResNet-20 teacher file -> ``spiking_tiny`` at T = 2, Fast synthesis
of 8 images, a few KD steps); each test module overrides the sections it is about.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

STARS_ON: dict[str, Any] = {
    "rca": {"weight": 0.1, "student_weight": 0.5},
    "tar": {"weight": 5.0},
    "spike_tar": {"weight": 1.0, "student_weight": 0.5},
}
"""Every STARS term switched on at small weights (spike-aware TAR in synthesis and KD)."""


def tiny_run_config(
    tmp: Path,
    teacher: Path,
    *,
    data_root: Path | None = None,
    file: str = "cfg.yaml",
    warmup_epochs: int = 0,
    **sections: Any,
) -> Path:
    """Write a tiny run config to ``tmp / file`` and return its path.

    ``data_root``: the CIFAR-10 ImageFolder tree (default: a folder that does not exist, for
    runs that never evaluate); ``warmup_epochs``: Fast's synthesis warm-up; ``sections``
    replace top-level sections whole (``distill``, ``evaluation``, ``stars``, ``name``...).
    Without them: 3 epochs of 2 KD steps, evaluation off, STARS off.
    """
    tree: dict[str, Any] = {
        "seed": 0,
        "device": "cpu",
        "output_dir": str(tmp / "runs"),
        "name": "tiny",
        "data": {"kind": "cifar10", "root": str(data_root or tmp / "no-data")},
        "teacher": {"arch": "resnet20", "checkpoint": str(teacher)},
        "student": {"arch": "spiking_tiny", "T": 2},
        "synthesis": {
            "kind": "fast",
            "batch_size": 8,
            "g_steps": 2,
            "nz": 16,
            "memory_size": 64,
            "warmup_epochs": warmup_epochs,
        },
        "distill": {"epochs": 3, "kd_steps_per_epoch": 2, "batch_size": 8},
        "evaluation": {"enabled": False},
    }
    tree.update(sections)
    path = tmp / file
    path.write_text(yaml.safe_dump(tree))
    return path


def records(run: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records (of one ``event`` kind, when given)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if event is None or r["event"] == event]
