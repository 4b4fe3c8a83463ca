"""Spike statistics and energy estimates (stars.distill.spikes): property and hand-count tests."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import Tensor, nn

from stars.config import NeuronConfig
from stars.distill.spikes import (
    E_AC_PJ,
    E_MAC_PJ,
    ANNCost,
    SpikeStats,
    energy_table,
    measure_ann,
    measure_spikes,
)
from stars.models.students import SpikingVGG, spiking_tiny
from stars.models.teachers import CifarResNet
from stars.neurons import MultiStepNeuron, build_neuron

FAST = examples(8)
CPU = torch.device("cpu")
T, N, K, SIZE = 2, 4, 10, 16
seeds = st.integers(0, 2**16)


def _tiny(seed: int = 0) -> SpikingVGG:
    torch.manual_seed(seed)
    return spiking_tiny(K, T, NeuronConfig(), image_size=SIZE)


def _images(seed: int, n: int = N, scale: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=gen) * scale


def _all_hooks_removed(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class _SpikeLinear(nn.Module):
    """A single ``Linear(d, k)`` fed the input spikes ``[N, d]`` repeated over T steps."""

    def __init__(self, steps: int, d: int, k: int) -> None:
        super().__init__()
        self.steps = steps
        self.fc = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(x.unsqueeze(0).expand(self.steps, *x.shape))
        return out

    def spiking_neurons(self) -> list[tuple[str, nn.Module]]:
        return []


class _TwoLayer(nn.Module):
    """``Linear(d, h)`` on analog input once -> repeated over T -> IF neuron -> ``Linear(h, k)``."""

    def __init__(self, steps: int, d: int, h: int, k: int, *, explode: bool = False) -> None:
        super().__init__()
        self.steps = steps
        self.explode = explode
        self.fc_in = nn.Linear(d, h)
        self.sn = build_neuron(NeuronConfig(kind="if", v_threshold=0.5))
        self.fc_out = nn.Linear(h, k)

    def spikes(self, x: Tensor) -> Tensor:
        """Input ``[N, d]`` -> spikes ``[T, N, h]``."""
        current = self.fc_in(x)
        out: Tensor = self.sn(current.unsqueeze(0).expand(self.steps, *current.shape))
        return out

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc_out(self.spikes(x))
        if self.explode:
            raise RuntimeError("boom")
        return out

    def spiking_neurons(self) -> list[tuple[str, nn.Module]]:
        return [("sn", self.sn)]


# spiking_tiny at 16x16: encoder 32@16x16 | max-pool | 64@8x8 | max-pool | 128@4x4 | max-pool |
# 256@2x2 | GAP | Linear(256, K). Neurons per image of each spiking layer:
TINY_NEURONS = {
    "encoder_neuron": 32 * 16 * 16,
    "features.2": 64 * 8 * 8,
    "features.5": 128 * 4 * 4,
    "features.8": 256 * 2 * 2,
}
TINY_ENCODER_MACS = 32 * 16 * 16 * (3 * 3 * 3)  # runs once on the image, not T times


@FAST
@given(seed=seeds, scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_rates_are_bounded_and_energy_is_consistent(seed: int, scale: float) -> None:
    model = _tiny(seed)
    stats = measure_spikes(model, _images(seed, scale=scale), CPU)
    assert set(stats.firing_rates) == set(TINY_NEURONS)
    assert [name for name, _ in model.spiking_neurons()] == list(stats.firing_rates)
    assert all(0.0 <= r <= 1.0 for r in stats.firing_rates.values())
    weighted = sum(stats.firing_rates[k] * n for k, n in TINY_NEURONS.items())
    assert stats.mean_firing_rate == pytest.approx(weighted / sum(TINY_NEURONS.values()))
    assert 0.0 <= stats.mean_firing_rate <= 1.0
    assert stats.images == N
    assert stats.synops >= 0.0
    assert stats.macs >= TINY_ENCODER_MACS
    assert stats.energy_pj == pytest.approx(E_AC_PJ * stats.synops + E_MAC_PJ * stats.macs)
    # Synaptic operations never exceed the dense count of the layer fed by the encoder
    # neuron plus the later layers' dense counts (summed over T).
    dense_after_encoder = T * (
        64 * 8 * 8 * 32 * 9 + 128 * 4 * 4 * 64 * 9 + 256 * 2 * 2 * 128 * 9 + K * 256
    )
    assert stats.synops + stats.macs - TINY_ENCODER_MACS <= dense_after_encoder * (1 + 1e-9)


def test_energy_constants() -> None:
    assert (E_AC_PJ, E_MAC_PJ) == (0.9, 4.6)


@FAST
@given(seed=seeds)
def test_silent_student_has_no_spikes_and_only_encoder_macs(seed: int) -> None:
    model = _tiny(seed)
    for _, neuron in model.spiking_neurons():
        assert isinstance(neuron, MultiStepNeuron)
        neuron.v_threshold = 1e9
    stats = measure_spikes(model, _images(seed, scale=5.0), CPU)
    assert all(r == 0.0 for r in stats.firing_rates.values())
    assert stats.mean_firing_rate == 0.0
    assert stats.synops == 0.0
    # Only the encoder conv sees real values; every later layer sees all-zero (binary) input.
    assert stats.macs == TINY_ENCODER_MACS
    assert stats.energy_pj == pytest.approx(E_MAC_PJ * TINY_ENCODER_MACS)


@FAST
@given(
    seed=seeds,
    n=st.integers(1, 4),
    d=st.integers(1, 8),
    k=st.integers(1, 5),
    steps=st.integers(1, 3),
    p=st.floats(0.0, 1.0),
)
def test_linear_fed_spikes_counts_accumulates_by_hand(
    seed: int, n: int, d: int, k: int, steps: int, p: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, d, generator=gen) < p).float()
    ones = int(x.sum())
    stats = measure_spikes(_SpikeLinear(steps, d, k), x, CPU)
    # Each input spike reaches k outputs, at each of the T steps.
    assert stats.synops == pytest.approx(steps * k * ones / n)
    assert stats.macs == 0.0
    assert stats.firing_rates == {}
    assert stats.mean_firing_rate == 0.0
    assert stats.energy_pj == pytest.approx(E_AC_PJ * steps * k * ones / n)


@FAST
@given(seed=seeds, n=st.integers(1, 4), d=st.integers(1, 8), k=st.integers(1, 5))
def test_linear_fed_real_values_counts_dense_macs(seed: int, n: int, d: int, k: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, d, generator=gen) < 0.5).float()
    x[0, 0] = 0.5  # one non-binary value makes the whole input real-valued
    stats = measure_spikes(_SpikeLinear(T, d, k), x, CPU)
    assert stats.synops == 0.0
    assert stats.macs == T * k * d


@FAST
@given(seed=seeds, n1=st.integers(1, 4), n2=st.integers(1, 4))
def test_two_layer_network_matches_independent_count(seed: int, n1: int, n2: int) -> None:
    torch.manual_seed(seed)
    d, h, k = 6, 5, 3
    model = _TwoLayer(T, d, h, k)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n1, d, generator=gen) * 2, torch.randn(n2, d, generator=gen) * 2]
    with torch.no_grad():
        spikes = [model.spikes(b) for b in batches]
    total_spikes = sum(float(s.sum()) for s in spikes)
    images = n1 + n2
    stats = measure_spikes(model, iter(batches), CPU)
    assert stats.images == images
    assert stats.firing_rates["sn"] == pytest.approx(total_spikes / (T * images * h))
    assert stats.mean_firing_rate == pytest.approx(stats.firing_rates["sn"])
    assert stats.macs == pytest.approx(h * d)  # fc_in, once per image
    assert stats.synops == pytest.approx(k * total_spikes / images)  # fc_out, per spike


@FAST
@given(seed=seeds, split=st.integers(1, N - 1))
def test_splitting_the_batch_does_not_change_the_statistics(seed: int, split: int) -> None:
    model = _tiny(seed)
    x = _images(seed)
    whole = measure_spikes(model, x, CPU)
    parts = measure_spikes(model, [x[:split], x[split:]], CPU)
    assert parts.images == whole.images
    assert parts.firing_rates == pytest.approx(whole.firing_rates)
    assert parts.synops == pytest.approx(whole.synops)
    assert parts.macs == pytest.approx(whole.macs)


def test_hooks_removed_and_modes_restored() -> None:
    model = _tiny()
    model.train()
    model.encoder.bn.eval()  # a mixed state must come back as it was
    user_hook = model.head.register_forward_hook(lambda m, i, o: None)
    measure_spikes(model, _images(0), CPU)
    assert model.training
    assert not model.encoder.bn.training
    assert all(m.training for m in model.modules() if m is not model.encoder.bn)
    assert list(model.head._forward_hooks) == [user_hook.id]
    user_hook.remove()
    assert _all_hooks_removed(model)


def test_hooks_removed_and_mode_restored_when_forward_raises() -> None:
    model = _TwoLayer(T, 4, 3, 2, explode=True)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        measure_spikes(model, torch.randn(N, 4), CPU)
    assert _all_hooks_removed(model)
    assert all(m.training for m in model.modules())


def test_rejects_no_images_and_non_students() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        measure_spikes(_tiny(), [], CPU)
    assert _all_hooks_removed(_tiny())
    with pytest.raises(TypeError, match="spiking_neurons"):
        measure_spikes(nn.Linear(3, 2), torch.zeros(1, 3), CPU)


def test_measure_ann_matches_hand_count_of_cifar_resnet8() -> None:
    teacher = CifarResNet(8, num_classes=K, image_size=SIZE)
    teacher.train()
    cost = measure_ann(teacher, (3, SIZE, SIZE), CPU)
    # ResNet-8 = stem + one basic block per stage (16/32/64), on 16x16 -> 16, 8, 4 px maps.
    hand = (
        16 * 16 * 16 * (3 * 9)  # stem conv 3 -> 16
        + 2 * 16 * 16 * 16 * (16 * 9)  # stage 1: two 3x3 convs 16 -> 16 at 16x16
        + 32 * 8 * 8 * (16 * 9)  # stage 2: conv1 16 -> 32, stride 2
        + 32 * 8 * 8 * (32 * 9)  # stage 2: conv2 32 -> 32
        + 32 * 8 * 8 * 16  # stage 2: 1x1 projection shortcut
        + 64 * 4 * 4 * (32 * 9)  # stage 3: conv1 32 -> 64, stride 2
        + 64 * 4 * 4 * (64 * 9)  # stage 3: conv2 64 -> 64
        + 64 * 4 * 4 * 32  # stage 3: 1x1 projection shortcut
        + K * 64  # classifier
    )
    assert cost.macs == hand
    assert cost.energy_pj == pytest.approx(E_MAC_PJ * hand)
    assert teacher.training
    assert _all_hooks_removed(teacher)


def test_measure_ann_matches_sum_over_module_shapes() -> None:
    teacher = CifarResNet(8, num_classes=K, image_size=SIZE)
    sizes: dict[nn.Module, int] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, o.shape[-1] * o.shape[-2]))
        for m in teacher.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        teacher.eval()
        teacher(torch.zeros(1, 3, SIZE, SIZE))
    finally:
        for hook in hooks:
            hook.remove()
    expected = sum(
        m.out_channels * sizes[m] * m.in_channels // m.groups * m.weight[0, 0].numel()
        for m in teacher.modules()
        if isinstance(m, nn.Conv2d)
    ) + sum(m.weight.numel() for m in teacher.modules() if isinstance(m, nn.Linear))
    assert measure_ann(teacher, (3, SIZE, SIZE), CPU).macs == expected


def test_to_dict_is_json_serializable() -> None:
    stats = measure_spikes(_tiny(), _images(0), CPU)
    restored = json.loads(json.dumps(stats.to_dict()))
    assert SpikeStats(**restored) == stats
    cost = ANNCost(macs=10.0, energy_pj=46.0)
    assert ANNCost(**json.loads(json.dumps(cost.to_dict()))) == cost


def test_energy_table_rows() -> None:
    teacher = ANNCost(macs=1e6, energy_pj=E_MAC_PJ * 1e6)
    student = SpikeStats(
        firing_rates={"a": 0.1},
        mean_firing_rate=0.1,
        synops=E_MAC_PJ * 1e6 / (10 * E_AC_PJ),
        macs=0.0,
        energy_pj=E_MAC_PJ * 1e5,
        images=4,
    )
    rows = energy_table(student, teacher)
    assert all(len(row) == 3 and all(isinstance(c, str) for c in row) for row in rows)
    table = {metric: (t, s) for metric, t, s in rows}
    assert table["MACs / image"] == ("1 M", "0")
    assert table["Energy / image (uJ)"] == ("4.6", "0.46")
    assert table["Energy ratio (teacher / student)"] == ("1x", "10x")
    silent = SpikeStats({}, 0.0, 0.0, 0.0, 0.0, 1)
    ratio = {m: s for m, _, s in energy_table(silent, teacher)}["Energy ratio (teacher / student)"]
    assert ratio == "inf"
