"""Shared fixtures: a tiny materialized subset of the offline CIFAR-10 copy in ``shared/``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Test tensors are tiny: intra-op threads only add synchronization, and on a busy machine the
# spinning OpenMP workers made the teacher sweep ~6x slower (51 s vs 8 s on 2 shared cores).
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
"""The ``shared/`` folder beside the repository (holds ``data/cifar10``)."""

MATERIALIZE = SHARED / "data" / "cifar10" / "materialize.py"


def materialize_cifar10(out: Path, per_class: int) -> Path:
    """Write ``per_class`` CIFAR-10 images per class and split as ``out/{train,test}/<class>``.

    Skips the calling test (with the reason) when the offline copy is not there.
    """
    if not MATERIALIZE.is_file():
        pytest.skip(f"offline CIFAR-10 copy not found ({MATERIALIZE} is absent)")
    subprocess.run(
        [sys.executable, str(MATERIALIZE), str(out), "--per-class", str(per_class)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


MaterializeCifar = Callable[[int], Path]


@pytest.fixture(scope="session")
def materialize_cifar(tmp_path_factory: pytest.TempPathFactory) -> MaterializeCifar:
    """``make(per_class) -> root``: a fresh CIFAR-10 ImageFolder subset (skips if unavailable)."""

    def make(per_class: int) -> Path:
        return materialize_cifar10(tmp_path_factory.mktemp(f"cifar10-pc{per_class}"), per_class)

    return make


@pytest.fixture(scope="session")
def cifar_root(materialize_cifar: MaterializeCifar) -> Path:
    """A CIFAR-10 ImageFolder tree with 4 images per class in train/ and test/ (40 + 40)."""
    return materialize_cifar(4)


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized CIFAR-10 ResNet-20 teacher saved as safetensors + metadata."""
    import torch

    from stars.models.io import save_model
    from stars.models.teachers import build_teacher_arch

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    meta = {"kind": "teacher", "arch": "resnet20", "num_classes": 10, "image_size": 32}
    save_model(build_teacher_arch("resnet20", num_classes=10), path, meta)
    return path
