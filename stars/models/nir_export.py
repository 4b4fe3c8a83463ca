"""Export a spiking student to NIR, the Neuromorphic Intermediate Representation.

NIR (https://neuroir.org) is how networks move to neuromorphic hardware and simulators
(Lava-DL / Loihi 2, Sinabs / Speck, Rockpool / Xylo, SpiNNaker2, Norse, snnTorch). The graph
is written by spikingjelly 2.0's exporter (``spikingjelly.activation_based.nir_exchange``,
from the ``spikingjelly[nir]`` extra), which maps ``Conv2d``, ``Linear``, ``AvgPool2d``,
``Flatten`` and IF / LIF / PLIF nodes.

A stars student is not handed to the exporter as it is. :func:`deployable` first builds its
*deployable twin*, a network of plain spikingjelly layers in multi-step mode that computes the
same function in eval mode:

- every ``Conv2d`` + ``BatchNorm2d`` pair becomes one ``Conv2d`` with a bias, the BatchNorm
  (running statistics) folded into it (``torch.nn.utils.fusion.fuse_conv_bn_weights``,
  computed in float64, then cast to the export dtype);
- the direct encoder's convolution runs at every time step, so the graph's input is the image
  repeated ``T`` times (``[T, N, C, H, W]``), where stars computes it once and broadcasts it;
- a residual block's shortcut is added to the input of its second neuron (NIR sums the
  edges that enter a node);
- global average pooling is an ``AvgPool2d`` over the whole last feature map, then a
  ``Flatten``, then the ``Linear`` head (ResNet-19: ``Linear -> neuron -> Linear``);
- each neuron is a fresh spikingjelly node with the student's constants (PLIF keeps its
  learned ``w``; NIR stores it as a LIF with ``tau = 1 / sigmoid(w)``).

Refused, with a :class:`~stars.errors.StarsError` naming the layer: max-pooling (NIR and the
exporter have no max-pool node; distill the ``*_avg`` variant of the architecture instead,
e.g. ``spiking_tiny_avg``), and soft reset (NIR's IF and LIF reset to ``v_reset``).

In NIR's units each node's time constants are multiples of ``dt`` (1e-4 s, the exporter's
and most NIR tools' default): LIF ``tau = tau_steps * dt``, IF ``r = 1 / dt``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, assert_never

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from stars.errors import StarsError
from stars.models.layers import ConvBN, DirectEncoder, SeqToANN, SpikingBasicBlock
from stars.models.students import SpikingResNet, SpikingVGG
from stars.neurons import MultiStepNeuron

__all__ = [
    "AVG_VARIANTS",
    "NIR_DT",
    "DeployableStudent",
    "deployable",
    "export_checkpoint",
    "export_nir",
    "import_nir",
    "node_types",
]

NIR_DT = 1e-4
"""Seconds per time step in the NIR graph (spikingjelly's and most NIR tools' default)."""

AVG_VARIANTS = {
    "spiking_tiny": "spiking_tiny_avg",
    "spiking_vgg11": "spiking_vgg11_avg",
    "spiking_vgg16": "spiking_vgg16_avg",
}
"""The average-pool variant of each student architecture with max-pooling."""


def _sj() -> tuple[Any, Any, Any]:
    """spikingjelly's ``layer``, ``neuron`` and ``functional`` modules."""
    from spikingjelly.activation_based import functional, layer, neuron

    return layer, neuron, functional


def _nir_exchange() -> Any:
    try:
        from spikingjelly.activation_based import nir_exchange
    except ImportError as exc:  # pragma: no cover - nir is a dependency of stars
        raise StarsError(
            f"NIR export needs spikingjelly's nir extra ({exc}); "
            'install it with `pip install "spikingjelly[nir]"`'
        ) from None
    return nir_exchange


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype) -> nn.Module:
    """A multi-step spikingjelly ``Conv2d`` with a bias: ``conv`` with ``bn`` (eval) folded in."""
    layer, _, _ = _sj()
    out: Any = layer.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        step_mode="m",
    ).to(dtype)
    f64 = torch.float64
    weight = conv.weight.detach().to(f64)
    bias = None if conv.bias is None else conv.bias.detach().to(f64)
    if bn is not None:
        if bn.running_mean is None or bn.running_var is None:
            raise StarsError("BatchNorm without running statistics cannot be folded for export")
        gamma = torch.ones(bn.num_features, dtype=f64) if bn.weight is None else bn.weight
        beta = torch.zeros(bn.num_features, dtype=f64) if bn.bias is None else bn.bias
        weight, bias = fuse_conv_bn_weights(
            weight,
            bias,
            bn.running_mean.detach().to(f64),
            bn.running_var.detach().to(f64),
            bn.eps,
            gamma.detach().to(f64),
            beta.detach().to(f64),
        )
    elif bias is None:
        bias = torch.zeros(conv.out_channels, dtype=f64)
    assert bias is not None
    with torch.no_grad():  # float64 -> dtype: one rounding of the folded values
        out.weight.copy_(weight.detach())
        out.bias.copy_(bias.detach())
    folded: nn.Module = out
    return folded


def _linear(linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    layer, _, _ = _sj()
    out: nn.Module = layer.Linear(
        linear.in_features, linear.out_features, bias=linear.bias is not None, step_mode="m"
    ).to(dtype)
    out.load_state_dict(linear.state_dict())
    return out


def _neuron(module: nn.Module, where: str, dtype: torch.dtype) -> nn.Module:
    """A fresh multi-step spikingjelly node with the constants of a stars neuron."""
    if not isinstance(module, MultiStepNeuron):
        raise StarsError(f"{where}: expected a spiking neuron, got {type(module).__name__}")
    if module.v_reset is None:
        raise StarsError(
            f"{where}: soft reset (student.neuron.v_reset: null) cannot be exported to NIR, whose "
            "IF and LIF neurons reset the membrane to v_reset; distill with a hard reset "
            "(student.neuron.v_reset: 0.0) to export"
        )
    _, neuron, _ = _sj()
    node: Any = module.node
    common = {
        "v_threshold": module.v_threshold,
        "v_reset": module.v_reset,
        "step_mode": "m",
    }
    out: Any
    match module.kind:
        case "if":
            out = neuron.IFNode(**common)
        case "lif":
            out = neuron.LIFNode(tau=float(node.tau), decay_input=bool(node.decay_input), **common)
        case "plif":
            out = neuron.ParametricLIFNode(decay_input=bool(node.decay_input), **common).to(dtype)
            with torch.no_grad():
                out.w.copy_(node.w.detach())
        case _:
            assert_never(module.kind)
    made: nn.Module = out.to(dtype)
    return made


def _pool(module: nn.Module, where: str) -> nn.Module:
    layer, _, _ = _sj()
    if isinstance(module, nn.AvgPool2d):
        pool: nn.Module = layer.AvgPool2d(
            module.kernel_size,
            module.stride,
            module.padding,
            ceil_mode=module.ceil_mode,
            count_include_pad=module.count_include_pad,
            divisor_override=module.divisor_override,
            step_mode="m",
        )
        return pool
    raise StarsError(
        f"{where}: {type(module).__name__} cannot be exported to NIR (NIR and spikingjelly's "
        "exporter have no max-pool node); distill the average-pool variant of the "
        "architecture instead (student.arch: "
        + ", ".join(f"{arch} -> {avg}" for arch, avg in AVG_VARIANTS.items())
        + ")"
    )


class _DeployBlock(nn.Module):
    """A spiking basic block with folded convolutions: ``sn2(conv2(sn1(conv1(x))) + sc(x))``."""

    def __init__(self, block: SpikingBasicBlock, where: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv1 = _folded_conv(block.conv1.conv, block.conv1.bn, dtype)
        self.sn1 = _neuron(block.sn1, f"{where}.sn1", dtype)
        self.conv2 = _folded_conv(block.conv2.conv, block.conv2.bn, dtype)
        self.shortcut: nn.Module | None = None
        if isinstance(block.shortcut, ConvBN):
            self.shortcut = _folded_conv(block.shortcut.conv, block.shortcut.bn, dtype)
        self.sn2 = _neuron(block.sn2, f"{where}.sn2", dtype)

    def forward(self, x_seq: Tensor) -> Tensor:
        """Spikes ``[T, N, C, H, W] -> [T, N, C', H', W']``."""
        skip = x_seq if self.shortcut is None else self.shortcut(x_seq)
        out: Tensor = self.sn2(self.conv2(self.sn1(self.conv1(x_seq))) + skip)
        return out


class DeployableStudent(nn.Module):
    """The deployable twin of a stars student (see the module docstring).

    ``forward(x_seq [T, N, C, H, W]) -> logits_seq [T, N, K]``, where ``x_seq`` is the image
    repeated over time. The neurons are spikingjelly nodes, stateful in the usual
    spikingjelly way: call ``spikingjelly.activation_based.functional.reset_net`` between
    inputs. Module names follow the student's (``encoder``, ``encoder_neuron``,
    ``stages.S.B.sn1``, ``features.I``, ``head``), so the NIR nodes do too (dots become
    underscores).

    Args:
        student: a :class:`~stars.models.students.SpikingResNet` or
            :class:`~stars.models.students.SpikingVGG` (in any mode; BatchNorm is folded
            with its running statistics).
        dtype: the dtype of the twin's weights.

    Raises:
        StarsError: for max-pooling, soft reset or a module it cannot map.
    """

    def __init__(self, student: nn.Module, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        layer, _, functional = _sj()
        if not isinstance(student, SpikingResNet | SpikingVGG):
            raise StarsError(
                f"NIR export supports stars' spiking ResNets and VGGs, not {type(student).__name__}"
            )
        self.T = student.T
        self.image_size = student.image_size
        self.in_channels = student.in_channels
        encoder: DirectEncoder = student.encoder
        self.encoder = _folded_conv(encoder.conv, encoder.bn, dtype)
        self.encoder_neuron = _neuron(student.encoder_neuron, "encoder_neuron", dtype)
        body: nn.Module
        if isinstance(student, SpikingResNet):
            stages: list[nn.Module] = []
            for s, stage in enumerate(student.stages.children()):
                blocks: list[nn.Module] = []
                for b, block in enumerate(stage.children()):
                    if not isinstance(block, SpikingBasicBlock):
                        raise StarsError(
                            f"stages.{s}.{b}: {type(block).__name__} is not exportable"
                        )
                    blocks.append(_DeployBlock(block, f"stages.{s}.{b}", dtype))
                stages.append(nn.Sequential(*blocks))
            body = nn.Sequential(*stages)
        else:
            items: list[nn.Module] = []
            for i, module in enumerate(student.features):
                where = f"features.{i}"
                if isinstance(module, ConvBN):
                    items.append(_folded_conv(module.conv, module.bn, dtype))
                elif isinstance(module, MultiStepNeuron):
                    items.append(_neuron(module, where, dtype))
                elif isinstance(module, SeqToANN) and len(module.body) == 1:
                    items.append(_pool(module.body[0], where))
                else:
                    raise StarsError(
                        f"{where}: {type(module).__name__} has no NIR counterpart in this exporter"
                    )
            body = nn.Sequential(*items)
        self.body_name = "stages" if isinstance(student, SpikingResNet) else "features"
        self.add_module(self.body_name, body)
        with torch.no_grad():
            probe = torch.zeros(
                1, 1, self.in_channels, self.image_size, self.image_size, dtype=dtype
            )
            height, width = body(self.encoder_neuron(self.encoder(probe))).shape[-2:]
        functional.reset_net(self)
        self.pool = layer.AvgPool2d((int(height), int(width)), step_mode="m")
        self.flatten = layer.Flatten(step_mode="m")
        head = student.head
        if isinstance(head, nn.Linear):
            self.head: nn.Module = _linear(head, dtype)
        elif isinstance(head, nn.Sequential) and len(head) == 3:
            self.head = nn.Sequential(
                _linear(head[0], dtype),  # type: ignore[arg-type]
                _neuron(head[1], "head.1", dtype),
                _linear(head[2], dtype),  # type: ignore[arg-type]
            )
        else:
            raise StarsError(f"head: {type(head).__name__} has no NIR counterpart")
        self.eval()

    def forward(self, x_seq: Tensor) -> Tensor:
        """Images repeated over time ``[T, N, C, H, W]`` -> ``logits_seq [T, N, K]``."""
        body: nn.Module = getattr(self, self.body_name)
        spikes = body(self.encoder_neuron(self.encoder(x_seq)))
        logits: Tensor = self.head(self.flatten(self.pool(spikes)))
        return logits


def deployable(student: nn.Module, *, dtype: torch.dtype = torch.float32) -> DeployableStudent:
    """The deployable twin of ``student`` (:class:`DeployableStudent`)."""
    return DeployableStudent(student, dtype=dtype)


@contextlib.contextmanager
def _quiet_spikingjelly() -> Iterator[None]:
    """Silence spikingjelly's loguru INFO lines ("Export completed ...") for the block."""
    try:
        from loguru import logger
    except ImportError:  # pragma: no cover - loguru is a spikingjelly dependency
        yield
        return
    logger.disable("spikingjelly")
    try:
        yield
    finally:
        logger.enable("spikingjelly")


def export_nir(
    student: nn.Module,
    path: Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
) -> Any:
    """Export a spiking student as a NIR graph (and write it to ``path`` as HDF5).

    The graph's input is the normalized image repeated over the student's ``T`` steps; its
    output is the logits at each step (predict with their mean over time, as in stars).

    Args:
        student: a stars spiking student (ResNet or VGG family) with hard reset and no
            max-pooling.
        path: where to write the graph (``nir.write``, HDF5); None: do not write. The file
            is written to a temporary name and renamed, so a failed export leaves nothing.
        dtype: the dtype of the exported weights.
        batch_size: the batch size of the example input used to infer the shapes (the
            graph itself does not depend on it).

    Returns:
        The ``nir.NIRGraph``.

    Raises:
        StarsError: for an architecture, layer or neuron NIR cannot represent.
    """
    twin = deployable(student, dtype=dtype)
    exchange = _nir_exchange()
    example = torch.zeros(
        twin.T, batch_size, twin.in_channels, twin.image_size, twin.image_size, dtype=dtype
    )
    with _quiet_spikingjelly():
        try:
            graph = exchange.export_to_nir(twin, example, dt=NIR_DT)
        except (NotImplementedError, ValueError) as exc:
            raise StarsError(f"spikingjelly's NIR exporter refused the student: {exc}") from None
    if path is not None:
        _write_graph(graph, path)
    return graph


def export_checkpoint(checkpoint: Path, out: Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """Export a student weights file written by ``stars distill`` to a NIR file.

    Rebuilds the student from the file's metadata (``arch``, ``T``, ``neuron``,
    ``num_classes``, ``image_size``), loads its weights (safetensors only) and calls
    :func:`export_nir`. Nothing is written when anything fails.

    Returns:
        The ``nir.NIRGraph`` written to ``out``.
    """
    from pydantic import ValidationError

    from stars.config import StudentConfig
    from stars.models.io import load_model_weights, read_metadata
    from stars.models.students import build_student

    meta = read_metadata(checkpoint)
    if meta.get("kind") != "student":
        raise StarsError(
            f"{checkpoint}: kind is {meta.get('kind')!r}, not 'student'; `stars export` takes "
            "the student.safetensors written by `stars distill` (with its .json beside it)"
        )
    try:
        cfg = StudentConfig.model_validate(
            {"arch": meta.get("arch"), "T": meta.get("T"), "neuron": meta.get("neuron") or {}}
        )
        num_classes, image_size = int(meta["num_classes"]), int(meta["image_size"])
    except (ValidationError, KeyError, TypeError, ValueError) as exc:
        raise StarsError(
            f"{checkpoint}: the student metadata is incomplete or invalid ({exc})"
        ) from None
    student = build_student(cfg, num_classes=num_classes, image_size=image_size)
    load_model_weights(student, checkpoint, expect={"num_classes": num_classes})
    return export_nir(student.eval(), out, dtype=dtype)


def _write_graph(graph: Any, path: Path) -> None:
    import nir

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        nir.write(str(tmp), graph)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def import_nir(graph: Any, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A NIR graph (or a path to one) as a multi-step spikingjelly network.

    spikingjelly's importer (``import_from_nir``) builds a ``torch.fx.GraphModule`` whose
    ``forward(x_seq [T, N, C, H, W], state=None)`` returns ``(logits_seq [T, N, K], state)``.

    Args:
        graph: a ``nir.NIRGraph``, or the path of a file written by :func:`export_nir`.
        dtype: the dtype of the module's weights and state.
        device: where to build it.
    """
    exchange = _nir_exchange()
    source = str(graph) if isinstance(graph, str | Path) else graph
    with _quiet_spikingjelly():
        module: nn.Module = exchange.import_from_nir(
            source, dt=NIR_DT, device=device, dtype=dtype, step_mode="m"
        )
    return module


def node_types(graph: Any) -> dict[str, int]:
    """How many nodes of each NIR type the graph holds, e.g. ``{"Conv2d": 9, "LIF": 9, ...}``."""
    counts: dict[str, int] = {}
    for node in graph.nodes.values():
        name = type(node).__name__
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
