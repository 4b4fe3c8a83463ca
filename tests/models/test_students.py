"""Sweep of every registered spiking student: shapes, gradients, BN / neuron listings."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

import pytest
import torch
from torch import nn

from stars.config import NeuronConfig, StudentArch, StudentConfig
from stars.models.protocols import SpikingStudent
from stars.models.students import STUDENT_PRESETS, SpikingVGG, build_student, spiking_tiny
from stars.neurons import MultiStepNeuron

T, N, K = 2, 2, 10


def _student(arch: str, *, image_size: int = 32, neuron: NeuronConfig | None = None) -> Any:
    cfg = StudentConfig.model_validate({"arch": arch, "T": T, "neuron": neuron or NeuronConfig()})
    return build_student(cfg, num_classes=K, image_size=image_size)


def _images(image_size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, channels, image_size, image_size, generator=gen)


def _is_student(obj: object) -> bool:
    return isinstance(obj, SpikingStudent)


def test_presets_cover_every_configurable_arch() -> None:
    assert set(STUDENT_PRESETS) == set(get_args(StudentArch))


@pytest.mark.parametrize("arch", sorted(STUDENT_PRESETS))
def test_student_contract(arch: str) -> None:
    torch.manual_seed(0)
    model = _student(arch)
    assert _is_student(model)
    assert model.num_classes == K
    assert model.T == T

    bns = model.bn_layers()
    assert bns
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    assert len(bns) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    neurons = model.spiking_neurons()
    assert neurons
    assert all(isinstance(sn, MultiStepNeuron) for _, sn in neurons)
    assert len({name for name, _ in neurons}) == len(neurons)

    # Record the order in which BN layers and neurons actually run.
    seen: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m)) for m in bns]
    hooks += [sn.register_forward_hook(lambda m, i, o: seen.append(m)) for _, sn in neurons]
    try:
        features_seq, logits_seq = model.forward_features(_images())
    finally:
        for hook in hooks:
            hook.remove()
    assert [m for m in seen if m in set(bns)] == bns
    assert [m for m in seen if isinstance(m, MultiStepNeuron)] == [sn for _, sn in neurons]

    assert features_seq.shape == (T, N, model.feature_dim)
    assert logits_seq.shape == (T, N, K)
    assert bool(torch.isfinite(logits_seq).all())
    logits_seq.mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert bool(torch.isfinite(param.grad).all()), name


def test_spiking_resnet18_parameter_count() -> None:
    model = _student("spiking_resnet18")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 11.17e6) / 11.17e6 < 0.01


@pytest.mark.parametrize(
    ("arch", "modes"), [("spiking_tiny", (True, False)), ("spiking_resnet20", (True,))]
)
def test_forward_is_repeatable_without_state_leak(arch: str, modes: tuple[bool, ...]) -> None:
    model = _student(arch)
    x = _images()
    for mode in modes:
        model.train(mode)
        first = model(x)
        first.sum().backward()
        model(_images(seed=1)[:1])  # another batch in between
        second = model(x)
        assert torch.equal(first, second), mode


@pytest.mark.parametrize("arch", ["spiking_resnet18", "spiking_tiny"])
def test_64px_inputs(arch: str) -> None:
    model = _student(arch, image_size=64)
    with torch.no_grad():
        features_seq, logits_seq = model.forward_features(_images(64))
    assert features_seq.shape == (T, N, model.feature_dim)
    assert logits_seq.shape == (T, N, K)


def test_forward_matches_forward_features_and_neuron_config_propagates() -> None:
    neuron = NeuronConfig(kind="if", v_threshold=0.5, v_reset=None)
    model = spiking_tiny(K, T, neuron, in_channels=1).eval()
    x = _images(channels=1)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_features(x)[1])
    for _, sn in model.spiking_neurons():
        assert sn.kind == "if"
        assert sn.v_threshold == 0.5
        assert sn.v_reset is None


@pytest.mark.parametrize("arch", sorted(STUDENT_PRESETS))
def test_encoder_v_threshold_moves_the_encoder_alone(arch: str) -> None:
    neuron = NeuronConfig(v_threshold=0.5, tau=3.0, surrogate="sigmoid")
    torch.manual_seed(0)
    plain = _student(arch, neuron=neuron)
    torch.manual_seed(0)
    cfg = StudentConfig(arch=arch, T=T, neuron=neuron, encoder_v_threshold=0.05)
    model = build_student(cfg, num_classes=K)
    encoder = model.encoder_neuron
    assert isinstance(encoder, MultiStepNeuron)
    assert encoder.v_threshold == pytest.approx(0.05)
    assert (encoder.kind, encoder.tau) == ("lif", 3.0)
    # every other constant (tau, reset, surrogate and its alpha) as the last layer's
    last_layer = model.spiking_neurons()[-1][1]
    assert isinstance(last_layer, MultiStepNeuron)
    last = last_layer._fused_params()
    assert last is not None
    assert encoder._fused_params() == dataclasses.replace(last, v_threshold=0.05)
    others = [sn for _, sn in model.spiking_neurons() if sn is not encoder]
    assert others and all(sn.v_threshold == 0.5 for sn in others)
    assert model.spiking_neurons()[0] == ("encoder_neuron", encoder)
    # the same initial weights (no random numbers drawn), the same state keys
    a, b = plain.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = _images()
    with torch.no_grad():
        rate_plain = plain.encoder_neuron(plain.encoder(x, T)).mean()
        rate_low = encoder(model.encoder(x, T)).mean()
    # the same currents: at a tenth of the threshold the first step alone fires every
    # element above 0.05 (a positive fraction of N(0, 1)-like currents), which can only add
    assert rate_low > rate_plain


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="T must be"):
        spiking_tiny(K, 0, NeuronConfig())
    with pytest.raises(ValueError, match="too small"):
        SpikingVGG(
            K, T, NeuronConfig(), image_size=16, layout=(8, "M", 8, "M", 8, "M", 8, "M", 8, "M")
        )
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        spiking_tiny(K, T, NeuronConfig())(torch.zeros(T, N, 3, 32, 32))
