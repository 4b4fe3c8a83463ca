"""stars: ANN-to-SNN data-free knowledge distillation with STARS (arXiv 2605.27409).

The main entry points are importable from here; heavier ones (which import torch) load on
first use, so ``stars --help`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from stars.config import RunConfig, TeacherTrainConfig, load_config, load_teacher_config
from stars.errors import StarsError

__version__ = "0.1.0"

_LAZY = {
    "run_distill": "stars.recipes.distill",
    "build_components": "stars.pipeline",
    "train_teacher": "stars.recipes.train_teacher",
    "build_teacher": "stars.models",
    "build_student": "stars.models",
    "build_neuron": "stars.neurons",
    "build_synthesizer": "stars.synthesis",
    "KDDistiller": "stars.distill",
    "synthesize_dataset": "stars.recipes.synthesize",
    "export_run": "stars.recipes.synthesize",
}

__all__ = [
    "KDDistiller",
    "RunConfig",
    "StarsError",
    "TeacherTrainConfig",
    "__version__",
    "build_components",
    "build_neuron",
    "build_student",
    "build_synthesizer",
    "build_teacher",
    "export_run",
    "load_config",
    "load_teacher_config",
    "run_distill",
    "synthesize_dataset",
    "train_teacher",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stars' has no attribute {name!r}")
