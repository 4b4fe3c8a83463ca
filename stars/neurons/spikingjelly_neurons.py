"""Multi-step spiking neurons backed by spikingjelly 2.x (docs/design.md section 5).

:class:`MultiStepNeuron` wraps one of spikingjelly's ``LIFNode``, ``IFNode`` or
``ParametricLIFNode`` and drives it only through spikingjelly's *explicit-state* functional
interface (``multi_step_functional_forward`` with an explicit initial potential). The node's
own membrane memory is never read or written, so every call starts from a fresh state by
construction: no hidden state leaks between batches, no autograd graph is kept alive
between calls, and callers never need ``functional.reset_net``.

Backends. spikingjelly 2.0.0 no longer takes a ``backend=`` argument on its neurons and has
no CuPy backend. Its multi-step operators pick an implementation from the tensor's device:
on CPU a PyTorch implementation; on CUDA, by priority, its compiled CUDA kernels
(``"cuda"``), then Triton (``"triton"``), then PyTorch, overridable only process-wide by the
environment variable ``SJ_<NEURON>_CUDA_IMPLEMENTATION`` (e.g. ``SJ_LIF_CUDA_IMPLEMENTATION``),
read when spikingjelly is imported. The configured backend therefore means:

- ``"auto"``: on CUDA, spikingjelly's fused multi-step operator, implementation chosen by
  spikingjelly; on CPU, for LIF and IF, stars' memory-lean operator
  (:mod:`stars.neurons.fused`: the same function, about a third of the memory), and
  spikingjelly's operator for PLIF (learnable tau).
- ``"torch"``: spikingjelly's pure-PyTorch reference path on every device (autograd through
  a Python loop over time). It is selected by handing the node a surrogate that is not a
  spikingjelly built-in, which spikingjelly documents as "Python surrogate callable ->
  Torch reference".
- ``"triton"`` / ``"cupy"``: the fused operator, as ``"auto"``; on CUDA the neuron checks once
  per device that spikingjelly selected Triton (for ``"triton"``) or its native CUDA kernels
  (for ``"cupy"``, their successor) and emits a :class:`RuntimeWarning` otherwise. On CPU
  there is only the PyTorch implementation and nothing is checked.

All backends compute the same function (checked against :mod:`stars.neurons.reference`).
"""

from __future__ import annotations

import warnings
from typing import Any, Final, Literal, assert_never

import torch
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import surrogate as sj_surrogate
from torch import Tensor, nn

from stars.config import NeuronKind
from stars.neurons.fused import FusedNeuronParams, compiled_multi_step, fused_multi_step

__all__ = [
    "MultiStepNeuron",
    "NeuronBackend",
    "NeuronKind",
    "SurrogateKind",
    "TorchPathSurrogate",
    "build_surrogate",
]

SurrogateKind = Literal["atan", "sigmoid"]
NeuronBackend = Literal["auto", "torch", "cupy", "triton"]

# spikingjelly's name for the CUDA implementation each explicit backend asks for.
_SJ_CUDA_IMPLEMENTATION: Final[dict[str, str]] = {"triton": "triton", "cupy": "cuda"}
_FLOAT32_STATE: Final = (torch.float16, torch.bfloat16, torch.float32)


class TorchPathSurrogate(nn.Module):
    """A spikingjelly surrogate hidden from spikingjelly's kernel dispatch.

    spikingjelly only fuses surrogates that are instances of its own built-in classes; any
    other callable runs on its PyTorch reference path, with autograd through the callable.
    This wrapper delegates to the wrapped surrogate (same forward, same gradient) and so
    pins a neuron to that path on every device (backend ``"torch"``).

    Args:
        inner: a spikingjelly surrogate module (``ATan`` / ``Sigmoid``).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        """Heaviside of ``x`` (any shape) with the inner surrogate gradient."""
        out: Tensor = self.inner(x)
        return out


def build_surrogate(kind: SurrogateKind, alpha: float, *, torch_path: bool = False) -> nn.Module:
    """Build a spikingjelly surrogate spike function.

    Forward is the Heaviside step ``(x >= 0)``; backward uses the derivative of
    ``atan(pi/2 * alpha * x) / pi + 1/2`` (``"atan"``, Fang et al. 2021) or of
    ``sigmoid(alpha * x)`` (``"sigmoid"``).

    Args:
        kind: ``"atan"`` or ``"sigmoid"``.
        alpha: sharpness of the surrogate gradient (> 0).
        torch_path: wrap it in :class:`TorchPathSurrogate` to force spikingjelly's PyTorch
            reference path.

    Returns:
        A module mapping ``x [*]`` to spikes ``[*]``.
    """
    surrogate: nn.Module
    match kind:
        case "atan":
            surrogate = sj_surrogate.ATan(alpha=float(alpha))
        case "sigmoid":
            surrogate = sj_surrogate.Sigmoid(alpha=float(alpha))
        case _:
            assert_never(kind)
    return TorchPathSurrogate(surrogate) if torch_path else surrogate


class MultiStepNeuron(nn.Module):
    """A multi-step spiking neuron layer that starts from a fresh state on every call.

    Implements :class:`stars.neurons.protocols.SpikingNeuron`. Build it with
    :func:`stars.neurons.build_neuron`; the wrapped spikingjelly node is ``self.node``
    (for PLIF it owns the learnable ``w``, so ``tau = 1 / sigmoid(w)``).

    A forward pre-hook on this module sees the pre-spike input currents ``[T, N, *]``.

    Args:
        node: a spikingjelly ``LIFNode`` / ``IFNode`` / ``ParametricLIFNode``.
        kind: which of the three it is (``"lif"``, ``"if"``, ``"plif"``).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cupy"`` (see the module
            docstring). For ``"torch"`` the node's surrogate must be a
            :class:`TorchPathSurrogate`, which :func:`build_neuron` arranges.
    """

    def __init__(self, node: nn.Module, *, kind: NeuronKind, backend: NeuronBackend) -> None:
        super().__init__()
        if backend == "torch" and not isinstance(
            getattr(node, "surrogate_function", None), TorchPathSurrogate
        ):
            raise ValueError("backend 'torch' needs the node's surrogate in a TorchPathSurrogate")
        self.node = node
        self.kind: NeuronKind = kind
        self.backend: NeuronBackend = backend
        self.compiled = False
        """Use :func:`~stars.neurons.fused.compiled_multi_step` for the CPU operator (set by
        ``compile: true`` through :func:`stars.runtime.maybe_compile`)."""
        self._checked_devices: set[torch.device] = set()

    def _fused_params(self) -> FusedNeuronParams | None:
        """The constants for :func:`fused_multi_step`, or ``None`` if it does not apply
        (PLIF, or a surrogate other than spikingjelly's ATan / Sigmoid)."""
        if self.kind == "plif" or self.backend != "auto":
            return None
        sg = getattr(self._sj, "surrogate_function", None)
        kind: Literal["atan", "sigmoid"]
        if isinstance(sg, sj_surrogate.ATan):
            kind = "atan"
        elif isinstance(sg, sj_surrogate.Sigmoid):
            kind = "sigmoid"
        else:
            return None
        return FusedNeuronParams(
            tau=float(self._sj.tau) if self.kind == "lif" else None,
            decay_input=bool(getattr(self._sj, "decay_input", True)),
            v_threshold=self.v_threshold,
            v_reset=self.v_reset,
            detach_reset=bool(self._sj.detach_reset),
            surrogate=kind,
            alpha=float(sg.alpha),
        )

    @property
    def _sj(self) -> Any:
        # The spikingjelly node, untyped (spikingjelly ships no type information).
        return self.node

    @property
    def v_threshold(self) -> float:
        """Firing threshold of the membrane potential."""
        return float(self._sj.v_threshold)

    @v_threshold.setter
    def v_threshold(self, value: float) -> None:
        self._sj.v_threshold = float(value)

    @property
    def v_reset(self) -> float | None:
        """Hard-reset potential, or ``None`` for soft reset (subtract the threshold)."""
        value = self._sj.v_reset
        return None if value is None else float(value)

    @property
    def tau(self) -> float | None:
        """Membrane time constant (``None`` for IF; for PLIF the current learned value)."""
        match self.kind:
            case "lif":
                return float(self._sj.tau)
            case "plif":
                w: Tensor = self._sj.w
                return 1.0 / float(torch.sigmoid(w.detach()))
            case "if":
                return None
            case _:
                assert_never(self.kind)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, backend={self.backend!r}"

    def _check_backend(self, device: torch.device) -> None:
        if device.type != "cuda" or self.backend in ("auto", "torch"):
            return
        if device in self._checked_devices:
            return
        self._checked_devices.add(device)
        report = sj_functional.neuron_implementation(self.kind, device)
        chosen = str(report["implementation"])
        wanted = _SJ_CUDA_IMPLEMENTATION[self.backend]
        if chosen != wanted:
            env = f"SJ_{self.kind.upper()}_CUDA_IMPLEMENTATION"
            warnings.warn(
                f"neuron backend {self.backend!r} asked for spikingjelly's {wanted!r} "
                f"implementation on {device}, but spikingjelly selected {chosen!r} "
                f"(unavailable: {report['unavailable']}); set {env}={wanted} before importing "
                "spikingjelly to force it. Results are the same, only speed differs.",
                RuntimeWarning,
                stacklevel=3,
            )

    def forward(self, x_seq: Tensor) -> Tensor:
        """Run the neuron over time from a fresh membrane state.

        Args:
            x_seq: input currents ``[T, N, *]`` (time first).

        Returns:
            spikes ``[T, N, *]``, exactly 0.0 / 1.0 in the dtype of ``x_seq``, with the
            surrogate gradient.
        """
        if x_seq.dim() < 2:
            raise ValueError(f"expected x_seq of shape [T, N, *], got {tuple(x_seq.shape)}")
        self._check_backend(x_seq.device)
        if x_seq.device.type == "cpu":
            params = self._fused_params()  # cheap; rebuilt so threshold changes apply
            if params is not None:
                op = compiled_multi_step if self.compiled else fused_multi_step
                return op(x_seq, params)
        v_reset = self.v_reset
        # The membrane potential is kept in float32 for half-precision inputs (more
        # accurate, and what spikingjelly's fused kernels expect), else in the input dtype.
        state_dtype = torch.float32 if x_seq.dtype in _FLOAT32_STATE else x_seq.dtype
        v_init = torch.full(
            x_seq.shape[1:],
            0.0 if v_reset is None else v_reset,
            dtype=state_dtype,
            device=x_seq.device,
        )
        outputs, _ = self._sj.multi_step_functional_forward((x_seq,), (v_init,))
        spike_seq: Tensor = outputs[0]
        # spikingjelly's PyTorch path returns the float32 state's dtype for half inputs
        return spike_seq.to(x_seq.dtype)
