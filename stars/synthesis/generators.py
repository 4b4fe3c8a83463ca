"""Image generators behind the :class:`~stars.synthesis.protocols.Generator` protocol.

Both return images in the teacher's *normalized* input space: pixels in [0, 1] (a sigmoid
for :class:`ConvGenerator`; :class:`PixelGenerator` is unconstrained like DeepInversion's
tensor) mapped through ``(x - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ConvGenerator", "Normalize", "PixelGenerator", "conv_body"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: a generator's [0, 1] output into the teacher's
    normalized input space."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class PixelGenerator(nn.Module):
    """DeepInversion's learnable image tensor (Yin et al., CVPR 2020).

    ``forward(z, y)`` ignores both and returns the tensor ``[N, C, H, W]``, which lives
    directly in the normalized space (initialized from N(0, 1), as DeepInversion does).
    """

    def __init__(self, n: int, channels: int, size: int, *, generator: torch.Generator) -> None:
        super().__init__()
        self.images = nn.Parameter(torch.randn(n, channels, size, size, generator=generator))

    def forward(self, z: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        return self.images


def conv_body(ngf: int, channels: int) -> nn.Sequential:
    """The DCGAN-style body shared by :class:`ConvGenerator` and NAYER's generator: from
    ``[N, 2*ngf, s/4, s/4]``, two (upsample x2, conv3x3, BN, LeakyReLU 0.2) stages (BN
    first), then conv3x3 to ``channels`` and a sigmoid: pixels in [0, 1], ``[N, C, s, s]``."""
    return nn.Sequential(
        nn.BatchNorm2d(ngf * 2),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(ngf * 2, ngf * 2, 3, padding=1, bias=False),
        nn.BatchNorm2d(ngf * 2),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(ngf * 2, ngf, 3, padding=1, bias=False),
        nn.BatchNorm2d(ngf),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ngf, channels, 3, padding=1),
        nn.Sigmoid(),
    )


class ConvGenerator(nn.Module):
    """DCGAN-style generator used by DAFL, DFAD, CMI and Fast.

    ``z [N, nz]`` (plus a learned class embedding of ``y [N]`` when ``num_classes`` is given)
    -> linear to ``2*ngf x s/4 x s/4`` -> two (upsample, conv3x3, BN, LeakyReLU) stages ->
    conv3x3 -> sigmoid -> normalization: images ``[N, C, s, s]`` in the normalized space.
    """

    def __init__(
        self,
        nz: int,
        *,
        image_size: int = 32,
        channels: int = 3,
        ngf: int = 64,
        num_classes: int | None = None,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.nz = nz
        self.init_size = image_size // 4
        self.embed = nn.Embedding(num_classes, nz) if num_classes else None
        self.l1 = nn.Linear(nz, ngf * 2 * self.init_size**2)
        self.ngf = ngf
        self.blocks = conv_body(ngf, channels)
        self.normalize = Normalize(mean, std)

    def first_layer(self) -> nn.Linear:
        """The latent projection Fast re-initializes once (``reset_l0``)."""
        return self.l1

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None and y is not None:
            z = z * self.embed(y)
        h = self.l1(z).view(z.shape[0], self.ngf * 2, self.init_size, self.init_size)
        images: Tensor = self.normalize(self.blocks(h))
        return images
