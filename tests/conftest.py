"""Hypothesis profiles, and shared fixtures (a tiny materialized subset of the offline
CIFAR-10 copy in ``shared/``).

Hypothesis profiles, chosen by the environment variable ``HYPOTHESIS_PROFILE`` (or pytest's
``--hypothesis-profile``, which wins); without it ``ci`` when ``CI`` is set, else ``dev``:

- ``ci``: derandomized (the examples are a function of the test alone, so a run is
  reproducible), no example database, and a failure prints its example and a reproduction
  blob. ``.ci/run`` selects it.
- ``dev``: random examples, with the example database in ``.hypothesis/`` (a failure found
  once is replayed first next time).
- ``thorough``: random, at least 1,000 examples per property (``hypothesis_budget.examples``
  raises each property's budget), failures printed with a blob and saved to the database.
- ``mutation``: ``ci``'s examples without shrinking or explaining a failure, for mutmut.

All of them: no deadline and no ``too_slow`` health check. Both are timings, which on a shared
machine vary from run to run; a property passes or fails by its examples only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis_budget import THOROUGH_EXAMPLES

PROFILE_ENV = "HYPOTHESIS_PROFILE"
# The parent is Hypothesis' own default: with CI set, Hypothesis has already loaded its
# built-in "ci" profile by now, whose derandomization must not leak into "dev" or "thorough".
_UNTIMED = settings(
    settings.get_profile("default"), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", _UNTIMED, derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", _UNTIMED)
settings.register_profile("thorough", _UNTIMED, max_examples=THOROUGH_EXAMPLES, print_blob=True)
# For mutation testing (README, Tests): the ci profile's examples, without shrinking or
# explaining a failure (which can take hundreds of runs of a mutant that already failed).
settings.register_profile(
    "mutation", settings.get_profile("ci"), phases=(Phase.explicit, Phase.reuse, Phase.generate)
)
_IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
settings.load_profile(os.environ.get(PROFILE_ENV) or ("ci" if _IN_CI else "dev"))

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


@pytest.fixture
def fresh_kernels() -> Iterator[None]:
    """The compiled neuron kernels (``stars.neurons.fused``) and BN statistics
    (``stars.synthesis.priors.compiled_batch_stats``) are built by ``torch.compile`` on first
    use and cached: rebuild them under a test's patched ``torch.compile``, and again after
    it."""
    from stars.neurons.fused import _kernels
    from stars.synthesis.priors import _compiled_stats

    _kernels.cache_clear()
    _compiled_stats.cache_clear()
    yield
    _kernels.cache_clear()
    _compiled_stats.cache_clear()


@pytest.fixture
def broken_compile(monkeypatch: pytest.MonkeyPatch, fresh_kernels: None) -> None:
    """``torch.compile`` returns functions that raise when called (a compiler that fails),
    with the neuron kernels rebuilt under it."""

    def compile_(fn: object, *args: object, **kwargs: object) -> object:
        def call(*a: object, **k: object) -> object:
            raise RuntimeError("backend exploded")

        return call

    monkeypatch.setattr(torch, "compile", compile_)
