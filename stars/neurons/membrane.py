"""Pre-spike membrane potentials of a multi-step neuron, read back from one forward pass.

Spike-aware STARS needs the student's *charged potential* ``H[t]`` (the value compared with
``v_threshold``) at chosen spiking layers, with a gradient, and without a second forward pass
of the network. No backend keeps ``H``: the fused CPU operator recomputes it in backward,
spikingjelly's CUDA/Triton kernels keep it on the device. What every backend does expose is
the layer's input currents ``X [T, N, *]`` and its output spikes ``S [T, N, *]``, and the two
determine ``H`` exactly:

- ``V[-1] = V_r`` (hard reset) or 0 (soft reset)
- charge (:mod:`stars.neurons.reference`): LIF with ``decay_input``
  ``H[t] = V[t-1] * (1 - 1/tau) + X[t] / tau + V_r / tau``; LIF without it
  ``H[t] = V[t-1] * (1 - 1/tau) + X[t] + V_r / tau``; IF ``H[t] = V[t-1] + X[t]``
- reset with the *observed* spikes: hard ``V[t] = S[t] V_r + (1 - S[t]) H[t]``, soft
  ``V[t] = H[t] - S[t] v_threshold``.

:func:`membrane_potential` replays this recurrence with ``S`` held constant (the spikes the
forward pass actually emitted), which is linear in ``X``: its gradient with respect to ``X``
(and hence to the images or the weights upstream) is exact for that spike pattern, and no
surrogate is involved. ``H[t] >= v_threshold`` reproduces ``S[t]`` (tested against the fused
operator, spikingjelly's path and the reference neuron). The charge follows the fused
operator's order of operations, so on the CPU backend the replay is bitwise the same
computation.

:class:`MembraneTap` hooks the chosen neurons for the duration of a ``with`` block and keeps
``(X, S)`` of their last call; hooks are always removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

from stars.neurons.spikingjelly_neurons import MultiStepNeuron

__all__ = [
    "MembraneParams",
    "MembraneTap",
    "membrane_potential",
    "soft_firing",
    "soft_firing_map",
]


@dataclass(frozen=True)
class MembraneParams:
    """The constants of a neuron's charge and reset. ``tau=None`` means IF (no leak)."""

    tau: float | None
    decay_input: bool
    v_threshold: float
    v_reset: float | None

    @classmethod
    def of(cls, neuron: MultiStepNeuron) -> MembraneParams:
        """The constants of ``neuron`` as they are now (PLIF: its current learned tau)."""
        return cls(
            tau=neuron.tau,
            decay_input=bool(getattr(neuron.node, "decay_input", True)),
            v_threshold=neuron.v_threshold,
            v_reset=neuron.v_reset,
        )


def membrane_potential(x_seq: Tensor, spike_seq: Tensor, params: MembraneParams) -> Tensor:
    """The charged potentials ``H [T, N, *]`` (float32) a neuron had in a forward pass.

    Args:
        x_seq: the neuron's input currents ``[T, N, *]`` (may carry a graph).
        spike_seq: the spikes it emitted ``[T, N, *]`` (0/1; used as constants).
        params: its constants (:meth:`MembraneParams.of`).

    Returns:
        ``H`` in float32 (float64 for float64 input), differentiable with respect to
        ``x_seq`` with the spike pattern held fixed.
    """
    if x_seq.shape != spike_seq.shape or x_seq.ndim < 2:
        raise ValueError(
            "membrane_potential: expected x_seq and spike_seq of the same shape [T, N, *]; got "
            f"{tuple(x_seq.shape)} and {tuple(spike_seq.shape)}"
        )
    cdt = torch.float64 if x_seq.dtype == torch.float64 else torch.float32
    x = x_seq.to(cdt)
    fired = spike_seq.detach().to(cdt)
    v_rest = 0.0 if params.v_reset is None else params.v_reset
    v: Tensor = torch.full_like(x[0], v_rest)
    out: list[Tensor] = []
    for t in range(x.shape[0]):
        if params.tau is None:
            h = v + x[t]
        else:
            k = 1.0 / params.tau
            # the fused operator's order of operations: v * (1 - k), then + alpha * x
            h = torch.add(v * (1.0 - k), x[t], alpha=k if params.decay_input else 1.0)
            if v_rest:
                h = h + v_rest * k
        out.append(h)
        if params.v_reset is None:
            v = h - fired[t] * params.v_threshold
        else:
            v = fired[t] * params.v_reset + (1.0 - fired[t]) * h
    return torch.stack(out)


def soft_firing(h_seq: Tensor, v_threshold: float, tau: float) -> Tensor:
    """Soft firing probability ``sigmoid((H - v_threshold) / tau)``, elementwise.

    It tends to the spike ``1[H >= v_threshold]`` as ``tau -> 0`` and has the gradient
    ``sigmoid' / tau`` near the threshold, where a Heaviside has none.

    Args:
        h_seq: charged potentials ``[T, N, *]`` (:func:`membrane_potential`).
        v_threshold: the neuron's threshold.
        tau: temperature in the potential's units, ``> 0``.

    Returns:
        ``[T, N, *]`` in ``[0, 1]``.
    """
    if not tau > 0:
        raise ValueError(f"soft_firing: tau must be > 0, got {tau}")
    return torch.sigmoid((h_seq - v_threshold) / tau)


def _charge_(v: Tensor, x: Tensor, params: MembraneParams, out: Tensor) -> Tensor:
    """``H`` from the previous potential ``v`` and the input ``x`` into ``out`` (the same
    operations as :func:`membrane_potential`)."""
    if params.tau is None:
        return torch.add(v, x, out=out)
    k = 1.0 / params.tau
    torch.add(v * (1.0 - k), x, alpha=k if params.decay_input else 1.0, out=out)
    v_rest = 0.0 if params.v_reset is None else params.v_reset
    if v_rest:
        out.add_(v_rest * k)
    return out


def _reset(h: Tensor, fired: Tensor, params: MembraneParams) -> Tensor:
    if params.v_reset is None:
        return h - fired * params.v_threshold
    return fired * params.v_reset + (1.0 - fired) * h


class _SoftFiringMap(torch.autograd.Function):
    """``mean_{t, c} sigmoid((H - V_th) / tau)`` with ``H`` replayed from ``(X, S)``; a lean
    backward that recomputes ``H`` and runs the (linear, spikes fixed) recurrence backwards
    in one pass, instead of autograd's graph through every step."""

    @staticmethod
    def forward(
        ctx: Any, x_seq: Tensor, spike_seq: Tensor, params: MembraneParams, tau: float
    ) -> Tensor:
        cdt = torch.float64 if x_seq.dtype == torch.float64 else torch.float32
        fired = spike_seq.detach().to(cdt)
        v = torch.full_like(x_seq[0], 0.0 if params.v_reset is None else params.v_reset, dtype=cdt)
        h = torch.empty_like(v)
        acc = torch.zeros((x_seq.shape[1], *x_seq.shape[3:]), dtype=cdt, device=x_seq.device)
        for t in range(x_seq.shape[0]):
            _charge_(v, x_seq[t].to(cdt), params, h)
            acc.add_(torch.sigmoid((h - params.v_threshold) / tau).sum(dim=1))
            v = _reset(h, fired[t], params)
        ctx.save_for_backward(x_seq, spike_seq)
        ctx.params, ctx.tau = params, tau
        return acc / (x_seq.shape[0] * x_seq.shape[2])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_map: Tensor) -> tuple[Tensor | None, None, None, None]:
        x_seq, spike_seq = ctx.saved_tensors
        params: MembraneParams = ctx.params
        tau: float = ctx.tau
        steps, cdt = x_seq.shape[0], grad_map.dtype
        fired = spike_seq.detach().to(cdt)
        buf = torch.empty(x_seq.shape, dtype=cdt, device=x_seq.device)
        v = torch.full_like(buf[0], 0.0 if params.v_reset is None else params.v_reset)
        for t in range(steps):
            _charge_(v, x_seq[t].to(cdt), params, buf[t])
            v = _reset(buf[t], fired[t], params)
        # d map / d H[t] = g / (T C) * s (1 - s) / tau, broadcast over channels
        g = (grad_map / (steps * x_seq.shape[2] * tau)).unsqueeze(1)
        k = None if params.tau is None else 1.0 / params.tau
        carry: Tensor | None = None
        for t in range(steps - 1, -1, -1):
            s = torch.sigmoid((buf[t] - params.v_threshold) / tau)
            dh = s.mul_(1.0 - s).mul_(g)
            if carry is not None:
                # H[t+1] = (1 - k) V[t] + ...; V[t] = H[t] (soft: minus a constant) or
                # (1 - S[t]) H[t] + S[t] V_r (hard)
                dh.add_(carry if params.v_reset is None else carry * (1.0 - fired[t]))
            carry = dh if k is None else dh * (1.0 - k)
            buf[t] = dh if (k is None or not params.decay_input) else dh * k
        return buf.to(x_seq.dtype), None, None, None


def soft_firing_map(
    x_seq: Tensor, spike_seq: Tensor, params: MembraneParams, *, tau: float
) -> Tensor:
    """``mean_{t, c} sigmoid((H - V_th) / tau)`` of a layer, ``[T, N, C, *] -> [N, *]``.

    The same value as ``soft_firing(membrane_potential(x_seq, spike_seq, params), V_th,
    tau).mean((0, 2))`` and the same gradient with respect to ``x_seq`` (spikes fixed), at a
    fraction of the memory and time: only ``x_seq`` and the spikes are kept for backward.

    Args:
        x_seq: the neuron's input currents ``[T, N, C, *]``.
        spike_seq: its spikes ``[T, N, C, *]``.
        params: its constants.
        tau: temperature in the potential's units, ``> 0``.

    Returns:
        ``[N, *]`` float32 (float64 for float64 input) in ``[0, 1]``.
    """
    if x_seq.shape != spike_seq.shape or x_seq.ndim < 3:
        raise ValueError(
            "soft_firing_map: expected x_seq and spike_seq of the same shape [T, N, C, *]; got "
            f"{tuple(x_seq.shape)} and {tuple(spike_seq.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"soft_firing_map: tau must be > 0, got {tau}")
    out: Tensor = _SoftFiringMap.apply(x_seq, spike_seq, params, float(tau))
    return out


class MembraneTap(Mapping[nn.Module, Tensor]):
    """Forward hooks on spiking neurons that keep each one's input currents and spikes.

    Inside the ``with`` block, ``tap[neuron]`` is the neuron's charged potential ``H [T, N,
    *]`` (float32, differentiable with respect to whatever produced its input; the spikes held
    fixed) from its last call, and :meth:`spikes` its output. Every hook is removed on exit,
    also when the body raises, and everything captured is dropped. Works with every backend
    (it only reads the module's input and output).

    Args:
        neurons: :class:`~stars.neurons.MultiStepNeuron` layers to hook.
    """

    def __init__(self, neurons: Sequence[nn.Module]) -> None:
        for n in neurons:
            if not isinstance(n, MultiStepNeuron):
                raise TypeError(f"MembraneTap hooks MultiStepNeuron layers, got {type(n).__name__}")
        if len({id(n) for n in neurons}) != len(neurons):
            raise ValueError("MembraneTap got the same neuron twice")
        self.neurons: tuple[MultiStepNeuron, ...] = tuple(neurons)  # type: ignore[arg-type]
        self._handles: list[RemovableHandle] = []
        self._io: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self._h: dict[nn.Module, Tensor] = {}

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._io[module] = (args[0], output)
        self._h.pop(module, None)

    def __enter__(self) -> Self:
        if self._handles:
            raise RuntimeError("this tap is already active; a tap cannot be entered twice")
        self._io.clear()
        self._h.clear()
        try:
            for n in self.neurons:
                self._handles.append(n.register_forward_hook(self._hook))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._io.clear()
        self._h.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def spikes(self, neuron: nn.Module) -> Tensor:
        """The spikes ``[T, N, *]`` ``neuron`` emitted in its last call."""
        return self._lookup(neuron)[1]

    def _lookup(self, neuron: nn.Module) -> tuple[Tensor, Tensor]:
        try:
            return self._io[neuron]
        except KeyError:
            raise KeyError(
                f"{type(neuron).__name__} has not been captured: it is not hooked by this tap, "
                "did not run, or the block has exited"
            ) from None

    def firing_map(self, neuron: nn.Module, tau: float) -> Tensor:
        """:func:`soft_firing_map` of ``neuron``'s last call: ``[N, *]``, differentiable."""
        x_seq, spikes = self._lookup(neuron)
        assert isinstance(neuron, MultiStepNeuron)
        return soft_firing_map(x_seq, spikes, MembraneParams.of(neuron), tau=tau)

    def __getitem__(self, neuron: nn.Module) -> Tensor:
        if neuron not in self._h:
            x_seq, spikes = self._lookup(neuron)
            assert isinstance(neuron, MultiStepNeuron)
            self._h[neuron] = membrane_potential(x_seq, spikes, MembraneParams.of(neuron))
        return self._h[neuron]

    def __iter__(self) -> Iterator[nn.Module]:
        return (n for n in self.neurons if n in self._io)

    def __len__(self) -> int:
        return len(self._io)

    def __contains__(self, neuron: object) -> bool:
        return neuron in self._io
