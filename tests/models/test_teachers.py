"""Sweep of every registered ANN teacher: shapes, gradients, features, BN order, sizes."""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import Tensor, nn

from stars.config import TeacherArch
from stars.models.protocols import Teacher
from stars.models.teachers import TEACHER_PRESETS, ANNTeacher, build_teacher_arch

N, K = 2, 7
BIG_INPUT_ARCHS = ("resnet18", "resnet20", "vgg11")


def _images(size: int, seed: int = 0, n: int = N) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen)


def _teacher(arch: str, image_size: int = 32, num_classes: int = K) -> ANNTeacher:
    torch.manual_seed(0)
    return build_teacher_arch(arch, num_classes=num_classes, image_size=image_size)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_presets_cover_every_configurable_arch() -> None:
    assert set(TEACHER_PRESETS) == set(get_args(TeacherArch))


def test_unknown_arch_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="resnet20") as info:
        build_teacher_arch("resnet21", num_classes=10)
    assert "resnet21" in str(info.value)


SWEEP = [(arch, 32) for arch in sorted(TEACHER_PRESETS)] + [(a, 64) for a in BIG_INPUT_ARCHS]


@pytest.mark.parametrize(("arch", "size"), SWEEP)
def test_teacher_contract(arch: str, size: int) -> None:
    model = _teacher(arch, size)
    assert isinstance(model, Teacher)
    assert model.num_classes == K
    x = _images(size)

    # forward + backward in train mode: logits [N, K], a finite gradient for every parameter
    logits = model(x)
    assert logits.shape == (N, K)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), f"{arch}: non-finite gradient in {name}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    # forward_features agrees with forward (eval mode: deterministic BN)
    model.eval()
    with torch.no_grad():
        feats, logits_f = model.forward_features(x)
        logits_e = model(x)
    assert feats.dim() == 2
    assert feats.shape[0] == N
    assert feats.shape[1] == model.fc.in_features
    torch.testing.assert_close(logits_f, logits_e)
    torch.testing.assert_close(model.fc(feats), logits_e)


@pytest.mark.parametrize("arch", sorted(TEACHER_PRESETS))
def test_bn_layers_are_every_batchnorm_in_forward_order(arch: str) -> None:
    model = _teacher(arch)
    bns = model.bn_layers()
    assert bns
    assert all(type(m) is nn.BatchNorm2d for m in bns)
    every_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(m) for m in bns} == {id(m) for m in every_bn}
    assert len(bns) == len(every_bn)

    called: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, _i, _o: called.append(mod)) for m in bns]
    try:
        model.eval()
        with torch.no_grad():
            model(_images(32, n=1))
    finally:
        for h in handles:
            h.remove()
    assert [id(m) for m in called] == [id(m) for m in bns], f"{arch}: bn_layers out of order"


@pytest.mark.parametrize(
    ("arch", "millions", "rel"),
    [("resnet18", 11.17, 0.005), ("resnet34", 21.28, 0.005), ("resnet20", 0.27, 0.02)],
)
def test_parameter_counts_match_the_literature(arch: str, millions: float, rel: float) -> None:
    count = _n_params(build_teacher_arch(arch, num_classes=10))
    assert count == pytest.approx(millions * 1e6, rel=rel)


@pytest.mark.parametrize("arch", BIG_INPUT_ARCHS)
def test_64px_stem_gives_the_32px_feature_map_sizes(arch: str) -> None:
    """A 64x64 teacher downsamples in the stem, so the pooled maps match the 32x32 model."""
    seen: dict[int, torch.Size] = {}

    def record(size: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], _o: Tensor) -> None:
            seen[size] = inputs[0].shape

        return hook

    for size in (32, 64):
        model = _teacher(arch, size).eval()
        handle = model.get_submodule("pool").register_forward_hook(record(size))
        try:
            with torch.no_grad():
                model(_images(size, n=1))
        finally:
            handle.remove()
    assert seen[64] == seen[32]
    assert seen[32][-1] >= 2


def test_64px_and_32px_teachers_have_the_same_parameters() -> None:
    a = build_teacher_arch("resnet20", num_classes=10, image_size=32)
    b = build_teacher_arch("resnet20", num_classes=10, image_size=64)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_num_classes_and_in_channels_reach_the_head() -> None:
    model = build_teacher_arch("wrn16_2", num_classes=100, in_channels=1)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 100)


_EVAL_MODEL = _teacher("resnet20").eval()


@examples(10)
@given(perm_seed=st.integers(0, 2**16), n=st.integers(2, 4))
def test_eval_mode_is_batch_permutation_equivariant(perm_seed: int, n: int) -> None:
    """In eval mode the images of a batch do not interact (BN uses running statistics)."""
    x = _images(32, seed=perm_seed, n=n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    with torch.no_grad():
        out = _EVAL_MODEL(x)
        out_perm = _EVAL_MODEL(x[perm])
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-4, atol=1e-5)
