"""Spike statistics and an energy estimate of a spiking student against its ANN teacher.

The counting follows the usual practice of SNN papers (e.g. Spikformer, Zhou et al. ICLR
2023; SEW-ResNet, Fang et al. NeurIPS 2021; Spike-driven Transformer, Yao et al. NeurIPS
2023), with the 45 nm CMOS figures of Horowitz (ISSCC 2014) for 32-bit floating point:

- a layer (``Conv1d/2d/3d`` or ``Linear``) fed *binary* spikes performs only accumulates
  (ACs, "synaptic operations", SOPs): ``SOPs = firing rate x T x FLOPs``, i.e. the dense
  MAC count of the layer times the fraction of its inputs that are non-zero, at
  :data:`E_AC_PJ` = 0.9 pJ each;
- a layer fed real values (the encoder conv on the analog image; the classifier on
  spatially averaged rates; a conv after an average pooling of spikes) performs
  multiply-accumulates (MACs) at :data:`E_MAC_PJ` = 4.6 pJ each;
- an ANN performs MACs only: every ``Conv``/``Linear`` layer, dense.

The dense MAC count of one call is ``output.numel() * in_channels / groups * prod(kernel)``
for a convolution and ``output.numel() * in_features`` for a linear layer. Bias additions,
BatchNorm (foldable into the weights), pooling, residual additions and the neurons' own
membrane updates are not counted, as in the papers above.

Counts come from forward hooks on what actually runs, so a student's layers on the folded
sequence ``[T * N, ...]`` are counted over all T steps, while the direct encoder, which
runs once on ``[N, C, H, W]`` and broadcasts its output over time
(:class:`stars.models.layers.DirectEncoder`), is counted once (papers that feed the image
T times count it T times). Every figure is per image; synaptic operations and MACs are
summed over the T steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from stars.models.protocols import Network

__all__ = [
    "E_AC_PJ",
    "E_MAC_PJ",
    "ANNCost",
    "SpikeStats",
    "energy_table",
    "measure_ann",
    "measure_spikes",
]

E_AC_PJ = 0.9
"""Energy of one 32-bit floating-point accumulate in 45 nm CMOS, pJ (Horowitz 2014)."""

E_MAC_PJ = 4.6
"""Energy of one 32-bit floating-point multiply-accumulate in 45 nm CMOS, pJ (3.7 + 0.9)."""

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_COUNTED_TYPES = (*_CONV_TYPES, nn.Linear)

_Hook = Callable[[nn.Module, tuple[Any, ...], Tensor], None]


@dataclass(frozen=True)
class SpikeStats:
    """Firing rates and operation counts of a spiking student, per image.

    Attributes:
        firing_rates: per spiking layer (the names of ``spiking_neurons()``), the mean
            number of spikes per neuron per time step over all measured images.
        mean_firing_rate: the firing rate over all spiking neurons together (the layers'
            rates weighted by their neuron counts); 0.0 without spiking layers.
        synops: accumulates (synaptic operations) per image, summed over the T steps.
        macs: real-valued multiply-accumulates per image, summed over the T steps.
        energy_pj: ``E_AC_PJ * synops + E_MAC_PJ * macs``, picojoules per image.
        images: number of images measured.
    """

    firing_rates: dict[str, float]
    mean_firing_rate: float
    synops: float
    macs: float
    energy_pj: float
    images: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy (plain dicts, floats and ints)."""
        return asdict(self)


@dataclass(frozen=True)
class ANNCost:
    """Operation count of an ANN, per image.

    Attributes:
        macs: multiply-accumulates of its ``Conv``/``Linear`` layers for one image.
        energy_pj: ``E_MAC_PJ * macs``, picojoules per image.
    """

    macs: float
    energy_pj: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy."""
        return asdict(self)


def _dense_macs(module: nn.Module, output: Tensor) -> int:
    """Dense multiply-accumulates of one call of a ``Conv``/``Linear`` ``module``."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, _CONV_TYPES):
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        return output.numel() * fan_in
    raise TypeError(f"cannot count operations of {type(module).__name__}")


def _is_binary(x: Tensor) -> bool:
    """Whether every value of ``x`` is exactly 0 or 1 (spikes)."""
    return bool(((x == 0) | (x == 1)).all())


@dataclass
class _Tally:
    """Mutable accumulators filled by the hooks of one measurement."""

    spikes: dict[str, float]
    elements: dict[str, int]
    acs: float = 0.0
    macs: float = 0.0


@contextmanager
def _eval_mode(model: Network) -> Iterator[None]:
    """Put ``model`` in eval mode; restore every submodule's own mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _spiking_neurons(student: Network) -> list[tuple[str, nn.Module]]:
    method = getattr(student, "spiking_neurons", None)
    if not callable(method):
        raise TypeError(
            f"{type(student).__name__} has no spiking_neurons(); expected a SpikingStudent"
        )
    pairs: list[tuple[str, nn.Module]] = []
    for name, neuron in method():
        if not isinstance(name, str) or not isinstance(neuron, nn.Module):
            raise TypeError("spiking_neurons() must return (str, nn.Module) pairs")
        pairs.append((name, neuron))
    return pairs


def measure_spikes(
    student: Network, batches: Iterable[Tensor] | Tensor, device: torch.device | str
) -> SpikeStats:
    """Measure the firing rates, synaptic operations, MACs and energy of a spiking student.

    Runs ``student`` in eval mode under ``torch.no_grad`` on every batch, with forward
    hooks on its spiking neurons (output spikes ``[T, N, *]``) and on its ``Conv``/``Linear``
    layers. A ``Conv``/``Linear`` call whose input is binary counts
    ``dense MACs x (non-zero fraction of its input)`` accumulates, any other call counts its
    dense MACs as multiply-accumulates (see the module docstring). The hooks are removed
    and every submodule's train/eval mode restored on exit, also when a forward raises.

    Args:
        student: a :class:`stars.models.protocols.SpikingStudent` (anything with
            ``spiking_neurons()`` and ``__call__(images)``), already on ``device``.
        batches: images ``[N, C, H, W]``, or an iterable of such batches.
        device: where the batches are moved before the forward.

    Returns:
        The statistics averaged over all images of all batches.

    Raises:
        TypeError: if ``student`` has no ``spiking_neurons()``.
        ValueError: if there are no images.
    """
    neurons = _spiking_neurons(student)
    names = [name for name, _ in neurons]
    tally = _Tally(spikes=dict.fromkeys(names, 0.0), elements=dict.fromkeys(names, 0))

    def neuron_hook(name: str) -> _Hook:
        def hook(_module: nn.Module, _inputs: tuple[Any, ...], output: Tensor) -> None:
            # Output spikes [T, N, *]: their mean is spikes per neuron per step.
            tally.spikes[name] += float(output.sum(dtype=torch.float64))
            tally.elements[name] += output.numel()

        return hook

    def layer_hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        dense = _dense_macs(module, output)
        x = inputs[0]
        if _is_binary(x):
            if x.numel() > 0:
                tally.acs += dense * int(torch.count_nonzero(x)) / x.numel()
        else:
            tally.macs += dense

    images = 0
    with ExitStack() as stack:
        for name, neuron in neurons:
            stack.callback(neuron.register_forward_hook(neuron_hook(name)).remove)
        for module in student.modules():
            if isinstance(module, _COUNTED_TYPES):
                stack.callback(module.register_forward_hook(layer_hook).remove)
        stack.enter_context(_eval_mode(student))
        stack.enter_context(torch.no_grad())
        for batch in (batches,) if isinstance(batches, Tensor) else batches:
            student(batch.to(device))
            images += batch.shape[0]

    if images == 0:
        raise ValueError("measure_spikes needs at least one image")
    rates = {
        name: (tally.spikes[name] / count if count else 0.0)
        for name, count in tally.elements.items()
    }
    total_elements = sum(tally.elements.values())
    mean_rate = sum(tally.spikes.values()) / total_elements if total_elements else 0.0
    synops = tally.acs / images
    macs = tally.macs / images
    return SpikeStats(
        firing_rates=rates,
        mean_firing_rate=mean_rate,
        synops=synops,
        macs=macs,
        energy_pj=E_AC_PJ * synops + E_MAC_PJ * macs,
        images=images,
    )


def measure_ann(
    teacher: Network, image_shape: tuple[int, int, int], device: torch.device | str
) -> ANNCost:
    """Count the multiply-accumulates of an ANN for one image.

    One forward of a zero batch ``[1, C, H, W]`` in eval mode under ``torch.no_grad``, with
    forward hooks on every ``Conv``/``Linear`` layer (dense count; removed on exit, and the
    modules' train/eval modes restored).

    Args:
        teacher: the ANN, already on ``device``.
        image_shape: ``(C, H, W)`` of one image.
        device: where the zero batch is created.

    Returns:
        The MACs and energy per image.
    """
    total = 0

    def hook(module: nn.Module, _inputs: tuple[Any, ...], output: Tensor) -> None:
        nonlocal total
        total += _dense_macs(module, output)

    param = next(teacher.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    with ExitStack() as stack:
        for module in teacher.modules():
            if isinstance(module, _COUNTED_TYPES):
                stack.callback(module.register_forward_hook(hook).remove)
        stack.enter_context(_eval_mode(teacher))
        stack.enter_context(torch.no_grad())
        teacher(torch.zeros(1, *image_shape, device=device, dtype=dtype))
    macs = float(total)
    return ANNCost(macs=macs, energy_pj=E_MAC_PJ * macs)


def _si(value: float) -> str:
    """``value`` with an SI prefix, three significant digits (``40.6 M``)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def energy_table(student_stats: SpikeStats, teacher_cost: ANNCost) -> list[tuple[str, str, str]]:
    """Rows ``(metric, teacher, student)`` comparing the costs per image, e.g. for rich.

    Args:
        student_stats: from :func:`measure_spikes`.
        teacher_cost: from :func:`measure_ann`.

    Returns:
        MACs, ACs (synaptic operations), mean firing rate, energy in microjoules and the
        energy ratio teacher / student (``inf`` when the student's estimate is 0).
    """
    teacher_uj = teacher_cost.energy_pj * 1e-6
    student_uj = student_stats.energy_pj * 1e-6
    if student_stats.energy_pj > 0:
        ratio = f"{teacher_cost.energy_pj / student_stats.energy_pj:.3g}x"
    else:
        ratio = "inf"
    return [
        ("MACs / image", _si(teacher_cost.macs), _si(student_stats.macs)),
        ("ACs (SynOps) / image", "0", _si(student_stats.synops)),
        ("Mean firing rate", "-", f"{student_stats.mean_firing_rate:.4f}"),
        ("Energy / image (uJ)", f"{teacher_uj:.4g}", f"{student_uj:.4g}"),
        ("Energy ratio (teacher / student)", "1x", ratio),
    ]
