"""``benchmarks/tail_mass.py``: activation tails of a run's synthesized images vs real ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import tail_mass
from stars.config import RunConfig
from stars.distill.checkpoint import save_state
from stars.models.teachers import ANNTeacher, build_teacher_arch
from stars.synthesis.memory import MemoryBank

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _cfg() -> RunConfig:
    return RunConfig.model_validate({"synthesis": {"kind": "fast", "batch_size": 8}})


def _teacher(shift: float) -> ANNTeacher:
    """A random ResNet-20 whose every BN layer says its input has mean ``shift``, std 1.

    It normalizes by batch statistics (train mode, momentum 0: the running ones never
    change), so its activations do not depend on ``shift``: only the thresholds move."""
    torch.manual_seed(0)
    t = build_teacher_arch("resnet20", num_classes=10).train()
    for m in t.bn_layers():
        assert m.running_mean is not None and m.running_var is not None
        m.running_mean.fill_(shift)
        m.running_var.fill_(1.0)
        m.momentum = 0.0
    return t


def test_tails_are_fractions_that_shrink_with_kappa() -> None:
    torch.manual_seed(1)
    x = torch.randn(24, 3, 32, 32)
    st = tail_mass.measure(_teacher(0.0), x, _cfg(), 8, (1.0, 2.0, 3.0))
    assert st.images == 24
    values = [st.tail[k] for k in (1.0, 2.0, 3.0)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[0] > values[1] > values[2]
    assert st.bn > 0.0 and all(v > 0.0 for v in st.tar.values())


def test_thresholds_follow_the_running_mean() -> None:
    """A running mean far above every activation leaves no tail; far below, all is tail."""
    x = torch.randn(8, 3, 32, 32)
    mid = tail_mass.measure(_teacher(0.0), x, _cfg(), 8, (1.0,))
    assert 0.0 < mid.tail[1.0] < 1.0
    high = tail_mass.measure(_teacher(1e6), x, _cfg(), 8, (1.0,))
    low = tail_mass.measure(_teacher(-1e6), x, _cfg(), 8, (1.0,))
    assert high.tail[1.0] == 0.0 and high.tail_last[1.0] == 0.0
    assert low.tail[1.0] == 1.0 and low.spread == 0.0


def test_bank_images_reads_the_checkpointed_bank(tmp_path: Path) -> None:
    pixels = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    state = {"synthesizer": {"ctx": {"bank": {"pixels": pixels, "labels": torch.zeros(5)}}}}
    save_state(tmp_path / "checkpoint.safetensors", state)
    got = tail_mass.bank_images(tmp_path, MEAN, STD)
    want = (pixels.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(got, want)
    assert torch.equal(MemoryBank(5, MEAN, STD).to_pixels(got), pixels)


def test_a_group_without_checkpoints_exits_2(tmp_path: Path) -> None:
    (tmp_path / "baseline-seed0").mkdir()
    with pytest.raises(SystemExit) as exc:
        tail_mass.main([str(tmp_path)])
    assert exc.value.code == 2
