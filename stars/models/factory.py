"""Build teachers from the config: architecture, weights (the bundled one by default)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TypeVar

from stars.config import TeacherConfig
from stars.errors import StarsError
from stars.models.io import load_model_weights
from stars.models.protocols import Network
from stars.models.teachers import ANNTeacher, build_teacher_arch

__all__ = ["BUNDLED_TEACHER", "build_teacher", "bundled_teacher_path", "freeze"]

BUNDLED_TEACHER = "resnet20_cifar10.safetensors"
"""The CIFAR-10 ResNet-20 teacher shipped in ``stars/assets`` (see README for its accuracy)."""


def bundled_teacher_path() -> Path:
    """Path of the bundled CIFAR-10 ResNet-20 weights inside the installed package."""
    return Path(str(resources.files("stars") / "assets" / BUNDLED_TEACHER))


_Net = TypeVar("_Net", bound=Network)


def freeze(model: _Net) -> _Net:
    """Eval mode and no gradients to parameters: a teacher is never trained by distillation."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(
    cfg: TeacherConfig,
    *,
    num_classes: int,
    image_size: int = 32,
    dataset: str = "cifar10",
    load_weights: bool = True,
) -> ANNTeacher:
    """The teacher a config names, with its weights loaded and checked, frozen.

    ``checkpoint: null`` takes the bundled CIFAR-10 ResNet-20, which exists only for
    ``arch: resnet20`` with 10 classes at 32x32.
    """
    model = build_teacher_arch(cfg.arch, num_classes=num_classes, image_size=image_size)
    if not load_weights:
        return model
    path = cfg.checkpoint
    if path is None:
        if (cfg.arch, num_classes, image_size, dataset) != ("resnet20", 10, 32, "cifar10"):
            raise StarsError(
                "teacher.checkpoint is null, which means the bundled CIFAR-10 ResNet-20, but the "
                f"config asks for {cfg.arch} with {num_classes} classes at {image_size}px "
                f"({dataset}); set teacher.checkpoint to a .safetensors file from "
                "`stars train-teacher`"
            )
        path = bundled_teacher_path()
        if not path.is_file():
            raise StarsError(f"the bundled teacher is missing from the installation: {path}")
    load_model_weights(
        model,
        path,
        expect={"arch": cfg.arch, "num_classes": num_classes, "image_size": image_size},
    )
    freeze(model)
    return model
