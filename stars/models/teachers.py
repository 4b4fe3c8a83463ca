"""ANN teachers for CIFAR-sized (32x32) and Tiny-ImageNet-sized (64x64) inputs.

Every teacher implements :class:`stars.models.protocols.Teacher`: ``forward(x) -> logits``,
``forward_features(x) -> (penultimate features, logits)`` and ``bn_layers()`` (every
BatchNorm2d in forward order, the layers DeepInversion-style synthesis matches).

Architectures:
  - ResNet-20/32/56: He et al., "Deep Residual Learning" (CVPR 2016), the CIFAR variant
    (16/32/64 channels, 3 stages of n basic blocks, option-B 1x1 projection shortcuts).
  - ResNet-18/34: the same paper's ImageNet block layout with the CIFAR 3x3 stem and no
    max-pool (as in zju-vipa/CMI and Fast-Datafree teachers).
  - VGG-11/13/16 with BN (Simonyan & Zisserman 2015), CIFAR head (a single linear layer).
  - WRN-16-1/16-2/40-1/40-2: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016).
  - VGG-8/11/13 with BN in the layout of the data-free KD repositories (CMI, Fast-Datafree,
    NAYER, SpaceshipNet; ``vgg*_cmi``): five blocks, convolutions with biases, max-pools
    after the first three blocks only (:class:`BlockVGG`), so their CIFAR checkpoints load
    (``stars convert-checkpoint --from cmi``).

For 64x64 inputs every architecture uses a stride-2 stem, so that the feature maps from the
first stage on have the same sizes as for 32x32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "TEACHER_PRESETS",
    "VGG",
    "ANNTeacher",
    "BlockVGG",
    "CifarResNet",
    "ResNet",
    "WideResNet",
    "build_teacher_arch",
]


class ANNTeacher(nn.Module):
    """Shared shell: subclasses define ``features`` (images -> penultimate) and ``fc``."""

    num_classes: int
    fc: nn.Linear

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[N, C, H, W]`` -> ``(features [N, D], logits [N, K])``."""
        feats = self.penultimate(x)
        return feats, self.fc(feats)

    def penultimate(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[N, C, H, W]`` -> logits ``[N, K]``."""
        logits: Tensor = self.fc(self.penultimate(x))
        return logits

    def bn_layers(self) -> list[nn.BatchNorm2d]:
        """Every BatchNorm2d, in forward order (module registration order follows it)."""
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU (He et al. 2016)."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class _StagedResNet(ANNTeacher):
    def __init__(
        self,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int,
        image_size: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        stem_stride = 2 if image_size >= 64 else 1
        self.conv1 = _conv3x3(in_channels, widths[0], stem_stride)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, w, stride))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def penultimate(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return torch.flatten(self.pool(out), 1)


class CifarResNet(_StagedResNet):
    """ResNet-(6n+2) for CIFAR: widths 16/32/64, n blocks per stage (He et al. 2016)."""

    def __init__(
        self, depth: int, num_classes: int = 10, image_size: int = 32, in_channels: int = 3
    ) -> None:
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        super().__init__((16, 32, 64), (n, n, n), num_classes, image_size, in_channels)


class ResNet(_StagedResNet):
    """ResNet-18/34 with a 3x3 stem and no max-pool (CIFAR layout), widths 64..512."""

    def __init__(
        self,
        blocks: Sequence[int],
        num_classes: int = 10,
        image_size: int = 32,
        in_channels: int = 3,
    ) -> None:
        super().__init__((64, 128, 256, 512), blocks, num_classes, image_size, in_channels)


_VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


class VGG(ANNTeacher):
    """VGG with BN; the last max-pool is replaced by global average pooling (CIFAR head)."""

    def __init__(
        self, name: str, num_classes: int = 10, image_size: int = 32, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        cin = in_channels
        cfg = list(_VGG_CFGS[name][:-1])
        for i, v in enumerate(cfg):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                stride = 2 if (i == 0 and image_size >= 64) else 1
                layers += [
                    nn.Conv2d(cin, v, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                cin = v
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def penultimate(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)


_BLOCK_VGG_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class BlockVGG(ANNTeacher):
    """VGG with BN as the data-free KD repositories build it for CIFAR (CMI, Fast-Datafree,
    NAYER and SpaceshipNet share these teachers).

    Five blocks of 3x3 convolutions (with biases) + BN + ReLU; a 2x2 max-pool after each of
    the first three blocks, after the fourth only for 64x64 inputs, none after the fifth;
    global average pooling and one ``Linear``. Against :class:`VGG` it has conv biases and
    one max-pool less at 32x32 (the last blocks run at 4x4, not 2x2). The stem keeps stride
    1 at every size.

    Args:
        name: ``vgg8``, ``vgg11`` or ``vgg13``.
        num_classes: classes ``K``.
        image_size: input height = width.
        in_channels: image channels.
    """

    def __init__(
        self, name: str, num_classes: int = 10, image_size: int = 32, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        cin = in_channels
        blocks = _BLOCK_VGG_CFGS[name]
        for b, widths in enumerate(blocks):
            for w in widths:
                layers += [
                    nn.Conv2d(cin, w, 3, padding=1, bias=True),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                ]
                cin = w
            if b < 3 or (b == 3 and image_size == 64):
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def penultimate(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)


class _WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv-BN-ReLU-conv + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(torch.relu(self.bn2(y)))
        skip: Tensor = self.shortcut(o) if self.shortcut is not None else x
        out: Tensor = y + skip
        return out


class WideResNet(ANNTeacher):
    """WRN-depth-k (Zagoruyko & Komodakis 2016): widths 16, 16k, 32k, 64k."""

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int = 10,
        image_size: int = 32,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.num_classes = num_classes
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv3x3(in_channels, widths[0], 2 if image_size >= 64 else 1)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(_WideBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def penultimate(self, x: Tensor) -> Tensor:
        out = self.blocks(self.conv1(x))
        out = torch.relu(self.bn(out))
        return torch.flatten(self.pool(out), 1)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


TeacherFactory = Callable[[int, int, int], ANNTeacher]

TEACHER_PRESETS: dict[str, TeacherFactory] = {
    "resnet20": lambda k, s, c: CifarResNet(20, k, s, c),
    "resnet32": lambda k, s, c: CifarResNet(32, k, s, c),
    "resnet56": lambda k, s, c: CifarResNet(56, k, s, c),
    "resnet18": lambda k, s, c: ResNet((2, 2, 2, 2), k, s, c),
    "resnet34": lambda k, s, c: ResNet((3, 4, 6, 3), k, s, c),
    "vgg11": lambda k, s, c: VGG("vgg11", k, s, c),
    "vgg13": lambda k, s, c: VGG("vgg13", k, s, c),
    "vgg16": lambda k, s, c: VGG("vgg16", k, s, c),
    "wrn16_2": lambda k, s, c: WideResNet(16, 2, k, s, c),
    "wrn40_2": lambda k, s, c: WideResNet(40, 2, k, s, c),
    "wrn16_1": lambda k, s, c: WideResNet(16, 1, k, s, c),
    "wrn40_1": lambda k, s, c: WideResNet(40, 1, k, s, c),
    "vgg8_cmi": lambda k, s, c: BlockVGG("vgg8", k, s, c),
    "vgg11_cmi": lambda k, s, c: BlockVGG("vgg11", k, s, c),
    "vgg13_cmi": lambda k, s, c: BlockVGG("vgg13", k, s, c),
}
"""Teacher architectures by name: ``factory(num_classes, image_size, in_channels)``."""


def build_teacher_arch(
    arch: str, *, num_classes: int, image_size: int = 32, in_channels: int = 3
) -> ANNTeacher:
    """A freshly initialized teacher of a named architecture."""
    try:
        factory = TEACHER_PRESETS[arch]
    except KeyError:
        raise ValueError(
            f"unknown teacher arch {arch!r}; allowed: {sorted(TEACHER_PRESETS)}"
        ) from None
    return factory(num_classes, image_size, in_channels)
