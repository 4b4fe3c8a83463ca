"""``stars.models.layers.MaxPool2d``: nn.MaxPool2d's values, indices and gradients, bit for bit.

Error model: max-pooling selects values (no arithmetic), and both of ATen's CPU forward
kernels keep the first maximum of a window, so the outputs are equal exactly; the backward
is the same NCHW kernel on the same indices, accumulating overlapping windows in the same
order, so the gradients are equal exactly too. Every comparison is ``torch.equal``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import nn

from stars.models.layers import MaxPool2d


@st.composite
def pools(draw: st.DrawFn) -> tuple[dict[str, object], torch.Tensor]:
    kernel = draw(st.integers(1, 3))
    padding = draw(st.integers(0, kernel // 2))
    kwargs: dict[str, object] = {
        "kernel_size": kernel,
        "stride": draw(st.none() | st.integers(1, 3)),
        "padding": padding,
        "dilation": draw(st.integers(1, 2)),
        "ceil_mode": draw(st.booleans()),
    }
    span = (kernel - 1) * int(kwargs["dilation"]) + 1  # type: ignore[call-overload]
    h, w = draw(st.integers(span, 9)), draw(st.integers(span, 9))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 19)), h, w)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    if draw(st.booleans()):  # binary spike maps: windows full of ties
        x = (torch.rand(shape, generator=gen) < 0.3).to(dtype)
    else:
        x = torch.randn(shape, generator=gen).to(dtype)
    return kwargs, x


@examples(80)
@given(case=pools())
def test_max_pool_matches_nn_max_pool_bit_for_bit(
    case: tuple[dict[str, object], torch.Tensor],
) -> None:
    kwargs, x = case
    ours, theirs = MaxPool2d(**kwargs), nn.MaxPool2d(**kwargs)  # type: ignore[arg-type]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(a), theirs(b)
    assert ya.is_contiguous() and ya.dtype == yb.dtype
    assert torch.equal(ya, yb)
    grad = torch.randn(yb.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    (ga,) = torch.autograd.grad(ya, a, grad)
    (gb,) = torch.autograd.grad(yb, b, grad)
    assert ga.is_contiguous()
    assert torch.equal(ga, gb)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_channels_last_kernel_is_the_one_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # What makes it faster: the forward pools a channels-last tensor (ATen's vectorized kernel).
    seen: list[bool] = []
    real = torch.ops.aten.max_pool2d_with_indices

    def spy(x: torch.Tensor, *args: object) -> object:
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return real(x, *args)

    monkeypatch.setattr(torch.ops.aten, "max_pool2d_with_indices", spy)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    MaxPool2d(2)(x).sum().backward()
    assert seen == [True]
    # return_indices keeps nn.MaxPool2d's own path and its (values, indices) result.
    y, idx = MaxPool2d(2, return_indices=True)(x)
    ref, ref_idx = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(y, ref) and torch.equal(idx, ref_idx)
