"""Run-level plumbing shared by commands: device, seeding, precision, run directories, logs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import numpy as np
import torch
import torch._dynamo.config
import torch._functorch.config
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn

from stars.errors import StarsError

if TYPE_CHECKING:
    from stars.models.students import SpikingClassifier
    from stars.models.teachers import ANNTeacher
    from stars.tensorboard_log import TensorBoardLog

__all__ = [
    "CompiledModel",
    "MetricsLog",
    "autocast",
    "compiled_or_eager",
    "eager_forwards",
    "make_run_dir",
    "maybe_compile",
    "progress_bar",
    "resolve_device",
    "seed_everything",
    "tune_malloc",
]


_T = TypeVar("_T")


def compiled_or_eager(
    compiled: Callable[[], Callable[..., _T]], eager: Callable[..., _T], *args: Any, what: str
) -> _T:
    """``compiled()(*args)``: ``compiled`` returns a ``torch.compile``d function (built on
    first use, cached by the caller). If compiling or running it fails, warn
    ``torch.compile failed for <what>`` and return ``eager(*args)``, the same function
    uncompiled. Up to 64 compiled variants per function (dynamo's default is 8: a process that
    tries many shapes and dtypes, the tests, would otherwise fall back silently)."""
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            return compiled()(*args)
    except Exception as exc:  # torch.compile raises many kinds; eager is always correct
        import warnings

        warnings.warn(f"torch.compile failed for {what} ({exc}); running it eagerly", stacklevel=3)
    return eager(*args)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; a CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StarsError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise StarsError("device 'mps' requested but MPS is not available; use device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """An autocast context for ``bf16``/``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_run_dir(
    output_dir: Path, name: str | None, prefix: str, *, overwrite: bool = False
) -> Path:
    """Create the run directory ``output_dir/name`` (or ``prefix-YYYYmmdd-HHMMSS``).

    An existing non-empty directory is refused unless ``overwrite``: nothing is lost.
    """
    run = output_dir / (name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run.exists() and any(run.iterdir()) and not overwrite:
        raise StarsError(
            f"run directory {run} already exists; pass --resume {run} to continue it, "
            "--overwrite to replace it, or choose another `name`"
        )
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise StarsError(f"cannot write to run directory {run}: {exc.strerror or exc}") from None
    return run


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed every write.

    ``path=None`` writes nothing (the ranks other than 0 of a data-parallel run).
    ``tensorboard=True`` also writes every record's numbers to ``path.parent / "tensorboard"``
    (:mod:`stars.tensorboard_log`); ``resume_after`` is the epoch a resumed run continues
    after (TensorBoard then drops what the interrupted session logged later).
    """

    def __init__(
        self, path: Path | None, *, tensorboard: bool = False, resume_after: int | None = None
    ) -> None:
        self.path = path
        self._tb: TensorBoardLog | None = None
        if path is not None and tensorboard:
            from stars.tensorboard_log import TB_DIR, TensorBoardLog

            fresh = not path.is_file() or path.stat().st_size == 0
            self._tb = TensorBoardLog(path.parent / TB_DIR, fresh=fresh, resume_after=resume_after)
        self._fh: TextIO | None = path.open("a", encoding="utf-8") if path is not None else None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            return
        line = json.dumps(dict(record), default=_jsonable)
        self._fh.write(line + "\n")
        self._fh.flush()
        if self._tb is not None:
            self._tb.write(json.loads(line))  # exactly what the line holds

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(x: object) -> object:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")
_malloc_tuned: bool | None = None


def tune_malloc(*, mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed CPU tensor memory in the process for reuse (glibc only; once per process).

    By default glibc serves every allocation above a dynamic threshold (128 KiB to start)
    with a fresh ``mmap`` and gives freed memory back to the system, so each new activation
    tensor of a training step is page-faulted in again: on CPU this costs as much as the
    elementwise ops that fill it (measured: STARS' TAR term, many 1-4 MiB temporaries per
    synthesis step). Raising the mmap and trim thresholds (``mallopt``) lets the allocator
    reuse that memory, as jemalloc / tcmalloc would (PyTorch's CPU tuning guide). Peak RSS is
    unchanged; memory is returned to the system at exit instead of after every step.

    Skipped (returns False) off glibc, or when the user already tunes the allocator
    (``MALLOC_*`` environment variables or an ``LD_PRELOAD``ed allocator). The stars CLI and
    benchmarks call it at start-up; library code never does.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if any(os.environ.get(k) for k in _MALLOC_ENV):
        return False
    name = ctypes.util.find_library("c")
    if name is None or "libc.so" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _malloc_tuned = bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    return _malloc_tuned


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def progress_bar(console: Console | None = None) -> Progress:
    """The progress bar style shared by long-running commands."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class CompiledModel(nn.Module):
    """``torch.compile`` of ``forward`` and ``forward_features``; keeps the other methods.

    Compilation is lazy in torch: if the first compiled call fails, a warning is issued and
    the model runs eagerly from then on (a genuine error then surfaces from the eager call).
    """

    def __init__(self, inner: ANNTeacher | SpikingClassifier) -> None:
        super().__init__()
        self.inner = inner
        # No buffers donated to backward (a process-wide setting, read when a backward graph
        # is compiled, lazily at the first backward): the gradient diagnostics (grad_norms)
        # differentiate one graph once per term (retain_graph=True), which a graph with
        # donated buffers refuses.
        torch._functorch.config.donated_buffer = False
        self._forward: Any = torch.compile(inner.forward)
        self._features: Any = torch.compile(inner.forward_features)
        self.eager = False

    def _run(self, compiled: Any, eager: Any, x: Tensor) -> Any:
        if not self.eager:
            try:
                return compiled(x)
            except Exception as exc:  # torch.compile raises many kinds; eager is always correct
                import warnings

                warnings.warn(f"torch.compile failed ({exc}); running eagerly", stacklevel=3)
                self.eager = True
        return eager(x)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self._run(self._forward, self._modules["inner"], x)
        return out

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out: tuple[Tensor, Tensor] = self._run(self._features, self.inner.forward_features, x)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.load_state_dict(*args, **kwargs)


@contextlib.contextmanager
def eager_forwards(*models: object) -> Iterator[None]:
    """Inside the block, :class:`CompiledModel` s among ``models`` run their eager forwards.

    For the gradient diagnostics (``SynthesisObjective.grad_norms``), which differentiate one
    graph once per term (``retain_graph=True``): through inductor's compiled backward on one
    thread every term after the first got a different gradient (torch 2.14; caught by
    ``tests/test_precision.py``), so they are taken eagerly."""
    switched = [m for m in models if isinstance(m, CompiledModel) and not m.eager]
    for m in switched:
        m.eager = True
    try:
        yield
    finally:
        for m in switched:
            m.eager = False


_Model = TypeVar("_Model", bound="ANNTeacher | SpikingClassifier")


def maybe_compile(model: _Model, *, graph: bool = True) -> _Model | CompiledModel:
    """``torch.compile`` the model's forwards; on failure warn and keep the eager model.

    Its multi-step neurons also switch to the compiled CPU operator
    (:func:`stars.neurons.fused.compiled_multi_step`). With ``graph=False`` that is all:
    the model's own forwards stay eager (what ``compile: true`` does to a student on the
    CPU, where inductor's max-pool and BN backward kernels made the whole-graph student
    slower than eager layers around compiled neurons: benchmarks/README.md).

    A compiled teacher (student) is still a :class:`~stars.models.protocols.Teacher`
    (:class:`~stars.models.protocols.SpikingStudent`): the wrapper forwards every other
    attribute to the model."""
    import warnings

    from stars.neurons.spikingjelly_neurons import MultiStepNeuron

    for module in model.modules():
        if isinstance(module, MultiStepNeuron):
            module.compiled = True
    if not graph:
        return model
    try:
        return CompiledModel(model)
    except Exception as exc:  # torch.compile raises many kinds; eager is always correct
        warnings.warn(f"torch.compile failed ({exc}); running eagerly", stacklevel=2)
        return model
