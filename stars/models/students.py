"""CIFAR-stem spiking students (docs/design.md s. 5): ResNet-18/19/20, VGG-11/16 and a tiny CNN.

All students are time-first and use direct encoding: the image ``[N, C, H, W]`` goes
through the first conv + BN once (the encoder), the result is repeated over ``T`` steps
and fed to a spiking neuron; every later conv / BN runs on ``[T * N, ...]``; spiking
neurons come from :func:`stars.neurons.build_neuron`. The output is ``logits_seq
[T, N, K]`` (predict with its mean over T). Each student implements
:class:`stars.models.protocols.SpikingStudent`:

- ``forward(x) -> logits_seq [T, N, K]``;
- ``forward_features(x) -> (features_seq [T, N, D], logits_seq)``, ``features_seq`` being
  the globally average-pooled output of the last spiking stage (firing rates over space,
  per step), i.e. the input of the classifier head;
- ``bn_layers()`` (every BatchNorm, forward order) and ``spiking_neurons()``
  (``(name, neuron)``, forward order).

Architectures:

- ResNets use the standard spiking basic block (:class:`~stars.models.layers.SpikingBasicBlock`,
  shortcut added before the block's last neuron; not SEW), 3x3 stem, no max-pool, 1x1
  conv + BN projection shortcuts.
  ``spiking_resnet18``: 64-128-256-512, blocks 2-2-2-2 (11.17M parameters for 10 classes);
  ``spiking_resnet19`` (tdBN / TET): 128-256-512, blocks 3-3-2, head
  ``Linear(512, 256) -> neuron -> Linear(256, K)``; ``spiking_resnet20``: 16-32-64, 3-3-3.
- VGGs: 3x3 conv + BN + neuron layers, 2x2 max-pooling ("M", which keeps spikes binary),
  global average pooling and a single ``Linear`` classifier (VGG-11 / VGG-16 layouts).
- ``spiking_tiny``: conv 32 (encoder) - max-pool - 64 - max-pool - 128 - max-pool - 256, global
  average pooling, ``Linear`` (0.39M parameters); trains on a CPU.
- ``spiking_vgg11_avg``, ``spiking_vgg16_avg``, ``spiking_tiny_avg``: the same with 2x2
  average pools ("A") in place of the max-pools, so that they export to NIR
  (:mod:`stars.models.nir_export`; NIR has no max-pool node).

Image size: below 64 px the stem has stride 1 (CIFAR); from 64 px (Tiny-ImageNet) the stem
convolution has stride 2, so the body sees CIFAR-sized maps. Global average pooling makes
every student accept any size its pooling allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor, nn

from stars.config import NeuronConfig, StudentConfig
from stars.models.layers import (
    ConvBN,
    DirectEncoder,
    MaxPool2d,
    SeqToANN,
    SpikingBasicBlock,
    collect_bn_layers,
    collect_spiking_neurons,
    stem_stride,
)
from stars.neurons import build_neuron

__all__ = [
    "STUDENT_PRESETS",
    "SpikingClassifier",
    "SpikingResNet",
    "SpikingVGG",
    "VGGLayout",
    "build_student",
    "spiking_resnet18",
    "spiking_resnet19",
    "spiking_resnet20",
    "spiking_tiny",
    "spiking_tiny_avg",
    "spiking_vgg11",
    "spiking_vgg11_avg",
    "spiking_vgg16",
    "spiking_vgg16_avg",
]

VGGLayout = Sequence[int | Literal["M", "A"]]
"""Conv widths (int) and 2x2 pools ("M" max, "A" average); the first entry is the encoder."""

_VGG11: VGGLayout = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
_VGG16: VGGLayout = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
_TINY: VGGLayout = (32, "M", 64, "M", 128, "M", 256)


def _average_pooled(layout: VGGLayout) -> VGGLayout:
    """The same layout with every max-pool replaced by a 2x2 average pool ("M" -> "A")."""
    return tuple("A" if item == "M" else item for item in layout)


def _check_common(num_classes: int, T: int, in_channels: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")


class SpikingClassifier(nn.Module):
    """What every student shares: direct encoder -> its neuron -> ``body()`` -> global
    average pooling over space -> ``head``, per time step. Implements
    :class:`~stars.models.protocols.SpikingStudent`."""

    num_classes: int
    T: int
    encoder: DirectEncoder
    encoder_neuron: nn.Module
    head: nn.Module

    def body(self) -> nn.Module:
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[N, C, H, W]`` -> ``(features_seq [T, N, D], logits_seq [T, N, K])``."""
        spikes: Tensor = self.body()(self.encoder_neuron(self.encoder(x, self.T)))
        features_seq = spikes.mean(dim=(3, 4))
        logits_seq: Tensor = self.head(features_seq)
        return features_seq, logits_seq

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[N, C, H, W]`` -> ``logits_seq [T, N, K]``."""
        return self.forward_features(x)[1]

    def bn_layers(self) -> list[nn.Module]:
        """Every BatchNorm in forward order."""
        return collect_bn_layers(self)

    def spiking_neurons(self) -> list[tuple[str, nn.Module]]:
        """``(name, neuron)`` for each spiking layer in forward order."""
        return collect_spiking_neurons(self)


class SpikingResNet(SpikingClassifier):
    """A CIFAR-stem spiking ResNet of standard spiking basic blocks (see the module docstring).

    Args:
        num_classes: classes ``K``.
        T: time steps.
        neuron: configuration of every spiking layer.
        image_size: input height = width (stride-2 stem from 64 px).
        in_channels: image channels.
        stage_channels: width of each stage; the first stage has stride 1, the others 2.
        stage_blocks: basic blocks per stage.
        stem_channels: encoder width (default: the first stage's width).
        head_hidden: if set, the head is ``Linear(D, head_hidden) -> neuron -> Linear(., K)``
            (ResNet-19); otherwise a single ``Linear(D, K)``.
    """

    def __init__(
        self,
        num_classes: int,
        T: int,
        neuron: NeuronConfig,
        image_size: int = 32,
        in_channels: int = 3,
        *,
        stage_channels: Sequence[int],
        stage_blocks: Sequence[int],
        stem_channels: int | None = None,
        head_hidden: int | None = None,
    ) -> None:
        super().__init__()
        _check_common(num_classes, T, in_channels)
        if len(stage_channels) != len(stage_blocks) or not stage_channels:
            raise ValueError("stage_channels and stage_blocks must be non-empty, equal length")
        self.num_classes = num_classes
        self.T = T
        self.image_size = image_size
        self.in_channels = in_channels

        width = stage_channels[0] if stem_channels is None else stem_channels
        self.encoder = DirectEncoder(in_channels, width, stride=stem_stride(image_size))
        self.encoder_neuron = build_neuron(neuron)
        stages: list[nn.Module] = []
        for index, (channels, blocks) in enumerate(zip(stage_channels, stage_blocks, strict=True)):
            layers: list[nn.Module] = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(SpikingBasicBlock(width, channels, stride, neuron))
                width = channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = width
        self.head: nn.Module = (
            nn.Linear(width, num_classes)
            if head_hidden is None
            else nn.Sequential(
                nn.Linear(width, head_hidden),
                build_neuron(neuron),
                nn.Linear(head_hidden, num_classes),
            )
        )

    def body(self) -> nn.Module:
        """The layers between the encoder neuron and global pooling."""
        return self.stages


class SpikingVGG(SpikingClassifier):
    """A plain spiking CNN: conv + BN + neuron layers and 2x2 pools, GAP, one ``Linear``.

    Args:
        num_classes: classes ``K``.
        T: time steps.
        neuron: configuration of every spiking layer.
        image_size: input height = width (stride-2 stem from 64 px).
        in_channels: image channels.
        layout: conv widths and pools ("M" max, "A" average); the first entry, a width, is
            the direct encoder.

    Raises:
        ValueError: if the layout does not start with a width, or the image is too small
            for its pools.
    """

    def __init__(
        self,
        num_classes: int,
        T: int,
        neuron: NeuronConfig,
        image_size: int = 32,
        in_channels: int = 3,
        *,
        layout: VGGLayout,
    ) -> None:
        super().__init__()
        _check_common(num_classes, T, in_channels)
        if not layout or isinstance(layout[0], str):
            raise ValueError("a VGG layout must start with the encoder's width")
        stride = stem_stride(image_size)
        pools = sum(1 for item in layout if isinstance(item, str))
        if -(-image_size // stride) < 2**pools:
            raise ValueError(f"image_size {image_size} is too small for {pools} 2x2 poolings")
        self.num_classes = num_classes
        self.T = T
        self.image_size = image_size
        self.in_channels = in_channels

        width = layout[0]
        self.encoder = DirectEncoder(in_channels, width, stride=stride)
        self.encoder_neuron = build_neuron(neuron)
        layers: list[nn.Module] = []
        for item in layout[1:]:
            match item:
                case "M":
                    layers.append(SeqToANN(MaxPool2d(2)))
                case "A":
                    layers.append(SeqToANN(nn.AvgPool2d(2)))
                case int():
                    layers += [ConvBN(width, item), build_neuron(neuron)]
                    width = item
                case _:
                    raise ValueError(f"unknown VGG layout entry {item!r}")
        self.features = nn.Sequential(*layers)
        self.feature_dim = width
        self.head = nn.Linear(width, num_classes)

    def body(self) -> nn.Module:
        """The layers between the encoder neuron and global pooling."""
        return self.features


def spiking_resnet18(
    num_classes: int, T: int, neuron: NeuronConfig, image_size: int = 32, in_channels: int = 3
) -> SpikingResNet:
    """CIFAR spiking ResNet-18: 64-128-256-512, basic blocks 2-2-2-2, ``Linear(512, K)``."""
    return SpikingResNet(
        num_classes,
        T,
        neuron,
        image_size,
        in_channels,
        stage_channels=(64, 128, 256, 512),
        stage_blocks=(2, 2, 2, 2),
    )


def spiking_resnet19(
    num_classes: int, T: int, neuron: NeuronConfig, image_size: int = 32, in_channels: int = 3
) -> SpikingResNet:
    """Spiking ResNet-19 (tdBN, Zheng et al. AAAI 2021; TET): 128-256-512, blocks 3-3-2,
    head ``Linear(512, 256) -> neuron -> Linear(256, K)``; features are the pooled 512-d."""
    return SpikingResNet(
        num_classes,
        T,
        neuron,
        image_size,
        in_channels,
        stage_channels=(128, 256, 512),
        stage_blocks=(3, 3, 2),
        head_hidden=256,
    )


def spiking_resnet20(
    num_classes: int, T: int, neuron: NeuronConfig, image_size: int = 32, in_channels: int = 3
) -> SpikingResNet:
    """CIFAR spiking ResNet-20 (He et al. 2016 layout): 16-32-64, basic blocks 3-3-3."""
    return SpikingResNet(
        num_classes,
        T,
        neuron,
        image_size,
        in_channels,
        stage_channels=(16, 32, 64),
        stage_blocks=(3, 3, 3),
    )


def spiking_vgg11(
    num_classes: int, T: int, neuron: NeuronConfig, image_size: int = 32, in_channels: int = 3
) -> SpikingVGG:
    """Spiking VGG-11 with BN (8 convs, 5 max-pools), GAP, ``Linear(512, K)``."""
    return SpikingVGG(num_classes, T, neuron, image_size, in_channels, layout=_VGG11)


def spiking_vgg16(
    num_classes: int, T: int, neuron: NeuronConfig, image_size: int = 32, in_channels: int = 3
) -> SpikingVGG:
    """Spiking VGG-16 with BN (13 convs, 5 max-pools), GAP, ``Linear(512, K)``."""
    return SpikingVGG(num_classes, T, neuron, image_size, in_channels, layout=_VGG16)


def spiking_tiny(
    num_classes: int, T: int, neuron: NeuronConfig, image_size: int = 32, in_channels: int = 3
) -> SpikingVGG:
    """A small CPU-trainable student: convs 32-64-128-256, each of the last three after a 2x2
    max-pool (about 15M synaptic operations per step at 32x32), GAP, ``Linear``."""
    return SpikingVGG(num_classes, T, neuron, image_size, in_channels, layout=_TINY)


def spiking_vgg11_avg(
    num_classes: int, T: int, neuron: NeuronConfig, image_size: int = 32, in_channels: int = 3
) -> SpikingVGG:
    """:func:`spiking_vgg11` with 2x2 average pools in place of the max-pools (exportable to
    NIR: :mod:`stars.models.nir_export`)."""
    return SpikingVGG(
        num_classes, T, neuron, image_size, in_channels, layout=_average_pooled(_VGG11)
    )


def spiking_vgg16_avg(
    num_classes: int, T: int, neuron: NeuronConfig, image_size: int = 32, in_channels: int = 3
) -> SpikingVGG:
    """:func:`spiking_vgg16` with 2x2 average pools in place of the max-pools (exportable to
    NIR)."""
    return SpikingVGG(
        num_classes, T, neuron, image_size, in_channels, layout=_average_pooled(_VGG16)
    )


def spiking_tiny_avg(
    num_classes: int, T: int, neuron: NeuronConfig, image_size: int = 32, in_channels: int = 3
) -> SpikingVGG:
    """:func:`spiking_tiny` with 2x2 average pools in place of the max-pools (exportable to
    NIR)."""
    return SpikingVGG(
        num_classes, T, neuron, image_size, in_channels, layout=_average_pooled(_TINY)
    )


STUDENT_PRESETS: dict[str, Callable[..., SpikingClassifier]] = {
    "spiking_resnet18": spiking_resnet18,
    "spiking_resnet19": spiking_resnet19,
    "spiking_resnet20": spiking_resnet20,
    "spiking_vgg11": spiking_vgg11,
    "spiking_vgg16": spiking_vgg16,
    "spiking_tiny": spiking_tiny,
    "spiking_vgg11_avg": spiking_vgg11_avg,
    "spiking_vgg16_avg": spiking_vgg16_avg,
    "spiking_tiny_avg": spiking_tiny_avg,
}
"""Every student architecture by its config name; each takes
``(num_classes, T, neuron, image_size=32, in_channels=3)``."""


def build_student(
    cfg: StudentConfig, *, num_classes: int, image_size: int = 32, in_channels: int = 3
) -> SpikingClassifier:
    """Build the spiking student a config describes.

    Args:
        cfg: architecture, time steps ``T``, neuron (and the encoder's own threshold).
        num_classes: classes ``K`` (from the dataset).
        image_size: input height = width (from the dataset).
        in_channels: image channels.

    Returns:
        A fresh student (:class:`~stars.models.protocols.SpikingStudent`).

    Raises:
        ValueError: for an architecture that is not in :data:`STUDENT_PRESETS`.
    """
    try:
        preset = STUDENT_PRESETS[cfg.arch]
    except KeyError:
        raise ValueError(
            f"unknown student arch {cfg.arch!r}; available: {sorted(STUDENT_PRESETS)}"
        ) from None
    student = preset(num_classes, cfg.T, cfg.neuron, image_size, in_channels)
    if cfg.encoder_v_threshold is not None:
        # the same neuron with its own threshold, in the encoder's place (it draws no random
        # numbers, so the other layers' initial weights do not move)
        encoder = cfg.neuron.model_copy(update={"v_threshold": cfg.encoder_v_threshold})
        student.encoder_neuron = build_neuron(encoder)
    return student
