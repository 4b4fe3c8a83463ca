"""Building blocks of the time-first spiking students (docs/design.md section 5).

Stateless layers (convolutions, BatchNorm, pooling) act on a sequence ``[T, N, ...]`` by
folding time into the batch, ``[T * N, ...]`` (the "SeqToANN" pattern of spikingjelly), so
BatchNorm normalizes over time, batch and space together. Spiking neurons act on the
sequence itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stars.config import NeuronConfig
from stars.neurons import MultiStepNeuron, build_neuron

__all__ = [
    "ConvBN",
    "DirectEncoder",
    "MaxPool2d",
    "SeqToANN",
    "SpikingBasicBlock",
    "collect_bn_layers",
    "collect_spiking_neurons",
    "stem_stride",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def stem_stride(image_size: int) -> int:
    """Stride of a student's first convolution for square inputs of ``image_size`` pixels.

    CIFAR-size inputs (< 64 px) keep full resolution (stride 1, the CIFAR stem);
    ``image_size >= 64`` (Tiny-ImageNet) gets a stride-2 stem so that the body sees the
    same feature-map sizes as on CIFAR at the same cost.

    Raises:
        ValueError: if ``image_size < 8``.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    return 2 if image_size >= 64 else 1


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Max-pooling of an NCHW tensor through ATen's channels-last forward kernel, with the
    NCHW backward kernel on NCHW indices: the same values, indices and gradients as
    ``F.max_pool2d`` (both kernels keep the first maximum of a window), faster on CPU."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, pool: nn.MaxPool2d) -> Tensor:
        y: Tensor
        idx: Tensor
        ctx.args = _pool_args(pool)
        y, idx = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), *ctx.args
        )
        ctx.save_for_backward(x, idx.contiguous())
        return y.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, idx = ctx.saved_tensors
        gx = torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.args, idx)
        return gx, None


def _pool_args(
    pool: nn.MaxPool2d,
) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """``(kernel_size, stride, padding, dilation, ceil_mode)`` as ATen's max-pool takes them."""

    def pair(v: Any) -> list[int]:
        return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]

    stride = pool.stride if pool.stride else pool.kernel_size
    return (
        pair(pool.kernel_size),
        pair(stride),
        pair(pool.padding),
        pair(pool.dilation),
        bool(pool.ceil_mode),
    )


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with the same values and gradients, faster on CPU for NCHW input.

    ATen's CPU max-pool forward on an NCHW tensor is a scalar loop; its channels-last kernel
    is vectorized over channels. On CPU, a 4-d NCHW-contiguous input is therefore pooled in
    channels-last and the result returned NCHW; the backward is ATen's NCHW kernel on the
    NCHW indices (its channels-last backward was slower). Both forward kernels keep the first
    maximum of a window, so the output, the indices and the gradient are bit-identical to
    ``nn.MaxPool2d``'s (binary spike maps, full of ties, included:
    ``tests/models/test_layers.py``). Measured on the paper_table Fast student at T = 4,
    batch 64: a bf16 KD step 0.917x, fp32 0.973x (docs/design.md section 5). Anything else (another
    device, ``return_indices``, inside ``torch.compile``) is ``nn.MaxPool2d``'s own path.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or not x.is_contiguous()
            or self.return_indices
            or torch.compiler.is_compiling()
        ):
            out: Tensor = super().forward(x)
            return out
        if not (torch.is_grad_enabled() and x.requires_grad):
            k, s, p, d, c = _pool_args(self)
            y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), k, s, p, d, c)
            return y.contiguous()
        pooled: Tensor = _ChannelsLastMaxPool.apply(x, self)
        return pooled


class SeqToANN(nn.Module):
    """Apply stateless modules to a time-first sequence by folding time into the batch.

    Args:
        *modules: applied in order to ``[T * N, ...]``.
    """

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*modules)

    def forward(self, x_seq: Tensor) -> Tensor:
        """``[T, N, *in] -> [T, N, *out]``."""
        t, n = x_seq.shape[:2]
        y: Tensor = self.body(x_seq.flatten(0, 1))
        return y.reshape(t, n, *y.shape[1:])


class ConvBN(nn.Module):
    """``Conv2d`` (no bias) then ``BatchNorm2d`` on a sequence ``[T, N, C, H, W]``.

    Args:
        in_channels: input channels ``C``.
        out_channels: output channels.
        kernel_size: square kernel; padding keeps the size at stride 1.
        stride: convolution stride.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x_seq: Tensor) -> Tensor:
        """``[T, N, C, H, W] -> [T, N, C', H / stride, W / stride]``."""
        t, n = x_seq.shape[:2]
        y: Tensor = self.bn(self.conv(x_seq.flatten(0, 1)))
        return y.reshape(t, n, *y.shape[1:])


class DirectEncoder(nn.Module):
    """Direct encoding: the first ``Conv2d`` + ``BatchNorm2d`` on the image, repeated T times.

    The image is the same at every step, so the encoder runs once on ``[N, C, H, W]`` and
    its output is broadcast over time (the same values and BN statistics as running it on
    the image repeated T times, at 1/T of the cost). A spiking neuron follows it.

    Args:
        in_channels: image channels.
        out_channels: encoder channels.
        stride: stem stride (see :func:`stem_stride`).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, T: int) -> Tensor:
        """Images ``[N, C, H, W]`` -> input currents ``[T, N, C', H', W']``."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape [N, C, H, W], got {tuple(x.shape)}")
        y: Tensor = self.bn(self.conv(x))
        return y.unsqueeze(0).expand(T, *y.shape)


class SpikingBasicBlock(nn.Module):
    """Standard spiking residual block (tdBN, Zheng et al. AAAI 2021; TET, Deng et al. ICLR 2022).

    ``out = SN(BN(conv(SN(BN(conv(x))))) + shortcut(x))``: the shortcut (identity, or a 1x1
    conv + BN when the shape changes) is added to the membrane *input* of the last neuron,
    so the block emits binary spikes (unlike SEW-ResNet, which adds spikes after the neuron).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution and of the projection shortcut.
        neuron: the neuron configuration used for both spiking layers.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, neuron: NeuronConfig
    ) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride)
        self.sn1 = build_neuron(neuron)
        self.conv2 = ConvBN(out_channels, out_channels, 3, 1)
        self.shortcut: nn.Module = (
            ConvBN(in_channels, out_channels, 1, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.sn2 = build_neuron(neuron)

    def forward(self, x_seq: Tensor) -> Tensor:
        """Spikes ``[T, N, C, H, W] -> [T, N, C', H / stride, W / stride]``."""
        out = self.conv2(self.sn1(self.conv1(x_seq)))
        shortcut: Tensor = self.shortcut(x_seq)
        spikes: Tensor = self.sn2(out + shortcut)
        return spikes


def collect_bn_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm module of ``model`` in registration order (= forward order in stars)."""
    return [m for m in model.modules() if isinstance(m, _BN_TYPES)]


def collect_spiking_neurons(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, neuron)`` for every spiking layer, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiStepNeuron)]
