"""``benchmarks/perf.py`` helpers: the ANN twin and the memory probe (small batch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.perf import EPOCH_LEVERS, EPOCH_PATCHES, _ann_twin, peak_memory
from stars.config import RunConfig, StudentConfig, apply_overrides
from stars.models.students import build_student
from stars.neurons import MultiStepNeuron


def test_ann_twin_has_no_spiking_neuron_left() -> None:
    twin = _ann_twin(build_student(StudentConfig(arch="spiking_tiny", T=1), num_classes=10))
    assert not any(isinstance(m, MultiStepNeuron) for m in twin.modules())


def test_peak_memory_probe() -> None:
    """The spiking step at T=4 needs more live memory than its ANN twin, and the fused
    neuron keeps it under the 4.5x goal at a small batch too."""
    mem = peak_memory(16)
    assert mem["snn_T4_live_mib"] > mem["ann_live_mib"] > 0
    assert 1.0 < mem["ratio_live"] < 4.5
    assert mem["snn_T4_rss_mib"] > 0


@pytest.mark.parametrize("lever", sorted(EPOCH_LEVERS))
def test_every_epoch_lever_is_a_valid_change_of_fast_yaml(lever: str) -> None:
    root = Path(__file__).resolve().parents[1]
    tree = yaml.safe_load((root / "benchmarks/paper_table/fast.yaml").read_text())
    base = RunConfig.model_validate(tree)
    cfg = RunConfig.model_validate(apply_overrides(tree, EPOCH_LEVERS[lever]))
    if lever in EPOCH_PATCHES:
        # a patched lever runs the config of the lever it is named after, then patches
        patched = lever
        for suffix in ("-eager-stats", "-no-measure", "-nchw-pool"):
            patched = patched.removesuffix(suffix)
        assert patched != lever and patched in EPOCH_LEVERS
        assert cfg == RunConfig.model_validate(apply_overrides(tree, EPOCH_LEVERS[patched]))
        return
    assert (cfg == base) == (lever == "fp32")


def test_nchw_pool_patch_puts_nn_max_pool_back() -> None:
    from types import SimpleNamespace

    from torch import nn

    from benchmarks.perf import _nchw_pool
    from stars.config import StudentConfig
    from stars.models.layers import MaxPool2d
    from stars.models.students import build_student

    student = build_student(StudentConfig(arch="spiking_tiny", T=2), num_classes=10)
    assert sum(isinstance(m, MaxPool2d) for m in student.modules()) == 3
    x = torch.randn(2, 3, 32, 32)
    before = student(x)
    _nchw_pool(SimpleNamespace(student=student))
    assert not any(isinstance(m, MaxPool2d) for m in student.modules())
    assert sum(type(m) is nn.MaxPool2d for m in student.modules()) == 3
    assert torch.equal(student(x), before)
