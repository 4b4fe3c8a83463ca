"""What the teacher holds without data: BatchNorm statistics and the tail prior (design.md s. 4).

Three pieces live here:

- :class:`FeatureTap` / :class:`BatchStatsTap`: context managers over forward hooks that
  capture what chosen modules see during a forward pass (the activations themselves, or only
  their per-channel batch mean and biased variance). Hooks are registered on ``__enter__`` and
  **always** removed on ``__exit__``, also when the body raises; captured tensors are dropped
  on exit too, so nothing outlives the block.
- :class:`BNPrior` / :func:`extract_bn_prior`: the running statistics of every BatchNorm
  layer, read once from the teacher (DeepInversion, Yin et al., CVPR 2020).
- :class:`TailPrior` / :func:`extract_tail_prior`: per-layer exceedance thresholds, sigmoid
  temperatures and target tail masses for Tail-Aware Regularization (STARS, arXiv 2605.27409;
  the exact definitions are ours, docs/design.md section 4).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from stars.config import TARConfig
from stars.runtime import compiled_or_eager

_V = TypeVar("_V")

__all__ = [
    "BNLayerPrior",
    "BNPrior",
    "BatchStatsTap",
    "FeatureTap",
    "TailLayerPrior",
    "TailPrior",
    "batch_stats",
    "compiled_batch_stats",
    "extract_bn_prior",
    "extract_tail_prior",
    "gaussian_tail",
    "laplace_tail",
]

Capture = Literal["input", "output"]

# Target masses of ``student-vth`` are clipped to this range (see extract_tail_prior).
_VTH_MIN_MASS = 1e-4
_VTH_MAX_MASS = 0.5
# |gamma| below this is treated as this (only to avoid a division by zero; the clipping of
# the standardized threshold then decides: a dead channel either always or never fires).
_GAMMA_FLOOR = 1e-8


# ----------------------------------------------------------------------------- statistics


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dimension but the channel one.

    This is what a BatchNorm layer in training mode normalizes with, and what DeepInversion
    matches against the running statistics. Computed in float32 at least (a bf16/fp16
    activation under autocast is upcast), differentiable.

    Args:
        x: ``[N, C, *]`` activations (``[N, C]`` for BatchNorm1d, ``[N, C, H, W]`` for
            BatchNorm2d).

    Returns:
        ``(mean [C], var [C])`` with ``var`` the biased (population) variance over
        ``N`` and all spatial positions.
    """
    if x.ndim < 2:
        raise ValueError(f"batch_stats expects [N, C, *] activations, got shape {tuple(x.shape)}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    dims = (0, *range(2, x.ndim))
    var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    return mean, var


@functools.cache
def _compiled_stats() -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    compiled: Callable[[Tensor], tuple[Tensor, Tensor]] = torch.compile(batch_stats)
    return compiled


def compiled_batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`batch_stats` under ``torch.compile`` (the synthesis objective's statistics
    under ``compile: true``).

    ATen's CPU ``var_mean`` over ``(N, H, W)`` of an NCHW tensor is a strided scalar loop;
    inductor's reduction is vectorized: on one CPU thread the Fast synthesis step (ResNet-20
    teacher, 19 BN layers) took 0.895x the time (benchmarks/README.md, session 14). Same
    statistics up to float rounding (another summation order; ``tests/synthesis/
    test_priors.py`` states the error model). The first call per shape compiles; if
    compiling or running fails, warn and compute eagerly (:func:`stars.runtime.compiled_or_eager`).
    """
    return compiled_or_eager(_compiled_stats, batch_stats, x, what="the BN statistics")


# ----------------------------------------------------------------------------- hooks


def _pick(capture: Capture, args: tuple[object, ...], output: object) -> Tensor:
    if capture == "input" and not args:
        raise TypeError("FeatureTap(capture='input') needs a module called with a positional input")
    value = args[0] if capture == "input" else output
    if not isinstance(value, Tensor):
        raise TypeError(
            f"FeatureTap captures tensors; the hooked module's {capture} is {type(value).__name__}"
        )
    return value


class _HookSet:
    """Registration bookkeeping shared by the taps (composition, not inheritance)."""

    def __init__(self, modules: Sequence[nn.Module], capture: Capture) -> None:
        if capture not in ("input", "output"):
            raise ValueError(f"capture must be 'input' or 'output', got {capture!r}")
        self.modules: tuple[nn.Module, ...] = tuple(modules)
        if len({id(m) for m in self.modules}) != len(self.modules):
            raise ValueError("FeatureTap got the same module twice")
        self.capture: Capture = capture
        self.handles: list[RemovableHandle] = []

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def register(self, store: Callable[[nn.Module, Tensor], None]) -> None:
        if self.handles:
            raise RuntimeError("this tap is already active; a tap cannot be entered twice")
        capture = self.capture

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            store(module, _pick(capture, args, output))

        try:
            for module in self.modules:
                self.handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()


class _Tap(Mapping[nn.Module, _V]):
    """Hooks on ``modules``, registered inside a ``with`` block; a read-only mapping from
    each module that ran to what ``_store`` kept of its input (or output)."""

    def __init__(
        self,
        modules: Sequence[nn.Module],
        *,
        capture: Capture = "input",
        detach: bool = False,
    ) -> None:
        self._hooks = _HookSet(modules, capture)
        self._detach = detach
        self._captured: dict[nn.Module, _V] = {}

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """The hooked modules, in the order given."""
        return self._hooks.modules

    @property
    def active(self) -> bool:
        """Whether the hooks are currently registered."""
        return self._hooks.active

    def _store(self, module: nn.Module, value: Tensor) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._captured.clear()
        self._hooks.register(self._store)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()
        self._captured.clear()

    def clear(self) -> None:
        """Forget what was captured so far (the hooks stay registered)."""
        self._captured.clear()

    def __getitem__(self, module: nn.Module) -> _V:
        try:
            return self._captured[module]
        except KeyError:
            raise KeyError(
                f"{type(module).__name__} has not been captured: it is not hooked by this tap, "
                "did not run in the forward pass, or the block has exited"
            ) from None

    def __iter__(self) -> Iterator[nn.Module]:
        return (m for m in self._hooks.modules if m in self._captured)

    def __len__(self) -> int:
        return len(self._captured)

    def __contains__(self, module: object) -> bool:
        return module in self._captured


class FeatureTap(_Tap[Tensor]):
    """Capture each module's input (or output) during the forward passes inside a block.

    A read-only mapping ``module -> tensor`` valid inside the ``with`` block; it keeps the
    autograd graph, so losses computed from the captured tensors backpropagate to the images.
    If a module runs several times, the last call wins. Every hook is removed on exit (also
    when the body raises) and every captured tensor is dropped.

    Example::

        with FeatureTap(teacher.bn_layers()) as tap:
            logits = teacher(images)
            loss = bn_matching(list(tap.values()), prior)

    Args:
        modules: the modules to hook, e.g. a teacher's ``bn_layers()``; iteration order of the
            tap follows this order (only modules that ran are present).
        capture: ``"input"`` (default; the BN input, what DeepInversion matches) or
            ``"output"``.
        detach: store detached tensors (for statistics and logging, no graph kept).
    """

    def _store(self, module: nn.Module, value: Tensor) -> None:
        self._captured[module] = value.detach() if self._detach else value


class BatchStatsTap(_Tap[tuple[Tensor, Tensor]]):
    """Like :class:`FeatureTap`, but keeps only per-channel ``(mean [C], var [C])``.

    The statistics are computed inside the hook with :func:`batch_stats` (biased variance
    over N and the spatial dimensions), so the activation itself is not held by the tap. With
    gradients on, autograd still saves what the backward needs; the saving is real under
    ``torch.no_grad()`` or with ``detach=True``.

    Args:
        modules: the modules to hook.
        capture: ``"input"`` (default) or ``"output"``.
        detach: compute the statistics without a graph.
    """

    def _store(self, module: nn.Module, value: Tensor) -> None:
        self._captured[module] = batch_stats(value.detach() if self._detach else value)


# ----------------------------------------------------------------------------- BN prior


@dataclass(frozen=True, eq=False)
class BNLayerPrior:
    """One BatchNorm layer's statistics (detached clones).

    Attributes:
        running_mean: ``[C]``.
        running_var: ``[C]`` (PyTorch keeps the unbiased estimate here).
        eps: the layer's ``eps``.
        weight: ``[C]`` the affine scale gamma, or ``None`` when the layer has no affine.
        bias: ``[C]`` the affine shift beta, or ``None``.
    """

    running_mean: Tensor
    running_var: Tensor
    eps: float
    weight: Tensor | None = None
    bias: Tensor | None = None

    @property
    def num_channels(self) -> int:
        """C."""
        return int(self.running_mean.shape[0])

    @property
    def std(self) -> Tensor:
        """``sqrt(running_var + eps)``, ``[C]``."""
        return torch.sqrt(self.running_var + self.eps)

    def to(self, device: torch.device | str) -> BNLayerPrior:
        """A copy on ``device``."""
        return BNLayerPrior(
            running_mean=self.running_mean.to(device),
            running_var=self.running_var.to(device),
            eps=self.eps,
            weight=None if self.weight is None else self.weight.to(device),
            bias=None if self.bias is None else self.bias.to(device),
        )


@dataclass(frozen=True, eq=False)
class BNPrior:
    """The BatchNorm prior of a network: one :class:`BNLayerPrior` per layer, forward order."""

    layers: tuple[BNLayerPrior, ...]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def running_means(self) -> tuple[Tensor, ...]:
        """Each layer's ``running_mean [C_l]``."""
        return tuple(layer.running_mean for layer in self.layers)

    @property
    def running_vars(self) -> tuple[Tensor, ...]:
        """Each layer's ``running_var [C_l]``."""
        return tuple(layer.running_var for layer in self.layers)

    def to(self, device: torch.device | str) -> BNPrior:
        """A copy on ``device``."""
        return BNPrior(tuple(layer.to(device) for layer in self.layers))


def _tensor_attr(module: nn.Module, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def _bn_modules(source: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(source, nn.Module):
        bn_layers = getattr(source, "bn_layers", None)
        if callable(bn_layers):
            return list(bn_layers())
        return [m for m in source.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return list(source)


def extract_bn_prior(source: nn.Module | Sequence[nn.Module]) -> BNPrior:
    """Read every BatchNorm layer's running statistics once (no data needed).

    Args:
        source: a teacher exposing ``bn_layers()`` (models/protocols.py), a list of BatchNorm
            modules, or any module (then all its ``_BatchNorm`` submodules in registration
            order).

    Returns:
        A frozen :class:`BNPrior` holding detached clones: later training of ``source`` does
        not change it.

    Raises:
        ValueError: no BatchNorm layer found, or a layer has no running statistics
            (``track_running_stats=False``).
    """
    modules = _bn_modules(source)
    if not modules:
        raise ValueError("extract_bn_prior: no BatchNorm layer found")
    layers: list[BNLayerPrior] = []
    for i, module in enumerate(modules):
        mean = _tensor_attr(module, "running_mean")
        var = _tensor_attr(module, "running_var")
        if mean is None or var is None:
            raise ValueError(
                f"extract_bn_prior: layer {i} ({type(module).__name__}) has no running statistics"
            )
        eps = getattr(module, "eps", 1e-5)
        weight = _tensor_attr(module, "weight")
        bias = _tensor_attr(module, "bias")
        layers.append(
            BNLayerPrior(
                running_mean=mean.detach().clone(),
                running_var=var.detach().clone(),
                eps=float(eps),
                weight=None if weight is None else weight.detach().clone(),
                bias=None if bias is None else bias.detach().clone(),
            )
        )
    return BNPrior(tuple(layers))


# ----------------------------------------------------------------------------- tail prior


@dataclass(frozen=True, eq=False)
class TailLayerPrior:
    """Thresholds, temperatures and targets of one layer for Tail-Aware Regularization.

    Attributes:
        theta: ``[K, C]`` exceedance thresholds, in the units of the tapped activation.
        tau: ``[C]`` sigmoid temperatures of the soft exceedance.
        p: ``[K, C]`` target tail masses, each in ``(0, 1)``.
    """

    theta: Tensor
    tau: Tensor
    p: Tensor

    def to(self, device: torch.device | str) -> TailLayerPrior:
        """A copy on ``device``."""
        return TailLayerPrior(self.theta.to(device), self.tau.to(device), self.p.to(device))


@dataclass(frozen=True, eq=False)
class TailPrior:
    """The tail prior of a network: one :class:`TailLayerPrior` per BatchNorm layer.

    Attributes:
        layers: per-layer thresholds, temperatures and targets, forward order.
        source: the ``TARConfig.source`` that produced it.
        levels: the kappas (``gaussian-bn``, ``laplace-bn``), the tail masses (``quantile``),
            or ``(v_th,)`` (``student-vth``), one per row ``k`` of ``theta``.
    """

    layers: tuple[TailLayerPrior, ...]
    source: str
    levels: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.layers)

    def to(self, device: torch.device | str) -> TailPrior:
        """A copy on ``device``."""
        return TailPrior(tuple(layer.to(device) for layer in self.layers), self.source, self.levels)


def gaussian_tail(kappa: Tensor) -> Tensor:
    """``1 - Phi(kappa)``, the standard normal's mass above ``kappa`` (computed as Phi(-kappa))."""
    out: Tensor = torch.special.ndtr(-kappa)
    return out


def laplace_tail(kappa: Tensor) -> Tensor:
    """Mass above ``mean + kappa * std`` of a Laplace law: ``0.5 * exp(-sqrt(2) * kappa)``.

    A Laplace law with standard deviation ``s`` has scale ``b = s / sqrt(2)``; the mass above
    ``kappa * s`` (kappa >= 0) is ``0.5 * exp(-kappa * s / b)``.
    """
    return 0.5 * torch.exp(-math.sqrt(2.0) * kappa)


def extract_tail_prior(
    bn_prior: BNPrior,
    cfg: TARConfig,
    *,
    student_vth: float | None = None,
) -> TailPrior:
    """Thresholds ``theta [K, C]``, temperatures ``tau [C]`` and targets ``p [K, C]`` per layer.

    For each layer, with ``mu = running_mean`` and ``s = sqrt(running_var + eps)`` (``[C]``),
    ``tau = cfg.tau_rel * s`` and, by ``cfg.source`` (docs/design.md section 4):

    - ``gaussian-bn`` (default): ``theta_k = mu + kappa_k * s`` for each ``kappa_k`` in
      ``cfg.kappas``; ``p_k = 1 - Phi(kappa_k)`` (0.159, 0.023, 0.0013 for kappa 1, 2, 3).
    - ``laplace-bn``: the same thresholds; ``p_k = 0.5 * exp(-sqrt(2) * kappa_k)`` (0.121,
      0.030, 0.0072), the tail of a Laplace law of the same mean and variance. Real CNN
      activations are closer to this beyond 2 std.
    - ``quantile``: one threshold per mass ``q_k`` in ``cfg.tail_masses``, placed where a
      Gaussian of the layer's statistics has that mass: ``theta_k = mu + Phi^-1(1 - q_k) * s``;
      ``p_k = q_k``.
    - ``student-vth``: one threshold per channel (``K = 1``), where the matching student
      neuron would fire. The layer's output is ``gamma * (h - mu) / s + beta`` and the
      student neuron fires when its (BN-normalized) input exceeds ``v_th``, so
      ``theta = mu + s * z`` with ``z = (v_th - beta) / gamma``; the target is the Gaussian
      tail ``p = 1 - Phi(z)``. Guards: ``gamma`` is replaced by ``max(|gamma|, 1e-8)``. A
      negative gamma makes firing a *lower*-tail event ``h < mu - s * z``; its Gaussian mass is
      the same as the upper tail above ``mu + s * z``, which is what soft exceedance can
      express, so we use the mirror image. ``z`` is clipped to
      ``[0, Phi^-1(1 - 1e-4)]``, i.e. ``p`` to ``[1e-4, 0.5]``, and ``theta`` is computed from
      the clipped ``z`` so that threshold and target stay consistent: a channel whose
      ``beta`` already exceeds ``v_th`` (fires at least half the time) gets the median as its
      threshold, a near-dead channel (``gamma ~ 0``, ``beta < v_th``) the ``1e-4`` tail.
      Without affine parameters, ``gamma = 1`` and ``beta = 0``. ``cfg.kappas`` is ignored.

    The thresholds live in the units of the BN layer's *input* (what :class:`FeatureTap`
    captures by default). For ``site: student`` pass the student's BN prior; the formulas
    are the same.

    Args:
        bn_prior: from :func:`extract_bn_prior`.
        cfg: the TAR configuration (``source``, ``kappas``, ``tail_masses``, ``tau_rel``).
        student_vth: the student's firing threshold; required for ``student-vth``.

    Returns:
        A frozen :class:`TailPrior` (float32 tensors on the prior's device).

    Raises:
        ValueError: ``student-vth`` without ``student_vth``, or a negative kappa.
    """
    layers: list[TailLayerPrior] = []
    levels: tuple[float, ...]
    if cfg.source in ("gaussian-bn", "laplace-bn"):
        levels = tuple(float(k) for k in cfg.kappas)
        if any(k < 0 for k in levels):
            raise ValueError(f"kappas must be >= 0, got {levels}")
    elif cfg.source == "quantile":
        levels = tuple(float(q) for q in cfg.tail_masses)
    elif cfg.source == "student-vth":
        if student_vth is None:
            raise ValueError("source 'student-vth' needs student_vth (the student's v_threshold)")
        levels = (float(student_vth),)
    else:  # pragma: no cover - the config's Literal forbids it
        raise ValueError(f"unknown tail source {cfg.source!r}")

    for layer in bn_prior.layers:
        dev = layer.running_mean.device
        mu = layer.running_mean.to(torch.float64)
        s = torch.sqrt(layer.running_var.to(torch.float64) + layer.eps)
        c = mu.shape[0]
        lv = torch.tensor(levels, dtype=torch.float64, device=dev)
        if cfg.source == "gaussian-bn":
            z = lv[:, None].expand(-1, c)
            p = gaussian_tail(z)
        elif cfg.source == "laplace-bn":
            z = lv[:, None].expand(-1, c)
            p = laplace_tail(z)
        elif cfg.source == "quantile":
            p = lv[:, None].expand(-1, c)
            z = torch.special.ndtri(1.0 - p)
        else:
            gamma = torch.ones_like(mu) if layer.weight is None else layer.weight.to(torch.float64)
            beta = torch.zeros_like(mu) if layer.bias is None else layer.bias.to(torch.float64)
            z_max = -float(torch.special.ndtri(torch.tensor(_VTH_MIN_MASS, dtype=torch.float64)))
            z_min = 0.0  # = Phi^-1(1 - 0.5)
            raw = (levels[0] - beta) / gamma.abs().clamp_min(_GAMMA_FLOOR)
            z = raw.clamp(z_min, z_max)[None, :]
            p = gaussian_tail(z).clamp(_VTH_MIN_MASS, _VTH_MAX_MASS)
        theta = mu[None, :] + z * s[None, :]
        layers.append(
            TailLayerPrior(
                theta=theta.to(torch.float32).contiguous(),
                tau=(cfg.tau_rel * s).to(torch.float32),
                p=p.to(torch.float32).contiguous(),
            )
        )
    return TailPrior(tuple(layers), cfg.source, levels)
