"""precision (bf16 autocast), channels_last and compile options, on the CPU."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_run import STARS_ON, records, tiny_run_config

from stars.config import load_config
from stars.pipeline import build_components
from stars.recipes.distill import run_distill


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> Path:
    return tiny_run_config(
        tmp_path_factory.mktemp("prec"),
        teacher_file,
        stars=STARS_ON,
        distill={"epochs": 2, "kd_steps_per_epoch": 2, "batch_size": 8},
    )


def test_bf16_and_channels_last_run_on_cpu(cfg_path: Path) -> None:
    cfg = load_config(cfg_path, ["precision=bf16", "channels_last=true", "name=bf16"])
    comp = build_components(cfg)
    conv = next(m for m in comp.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    result = run_distill(cfg, show_progress=False)
    epochs = records(result.run_dir, "epoch")
    assert len(epochs) == 2
    assert all(math.isfinite(v) for r in epochs for k, v in r.items() if k.startswith("kd/"))
    assert result.summary["skipped_kd_steps"] == 0


def test_bf16_changes_the_numbers(cfg_path: Path) -> None:
    a = build_components(load_config(cfg_path, ["precision=fp32"]))
    b = build_components(load_config(cfg_path, ["precision=bf16"]))
    sa, sb = a.synthesizer.synthesize(a.student), b.synthesizer.synthesize(b.student)
    assert sa.losses["bn"] != sb.losses["bn"], "autocast must actually be in effect"
    assert abs(sa.losses["bn"] - sb.losses["bn"]) < 0.05 * abs(sa.losses["bn"]) + 1e-3


def test_compile_failure_falls_back_with_a_warning(
    cfg_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_compile(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            raise RuntimeError("backend exploded")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = build_components(load_config(cfg_path))
    comp = build_components(load_config(cfg_path, ["compile=true"]))
    x = torch.randn(3, 3, 32, 32)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        out = comp.student(x)
    assert torch.equal(out, eager.student(x))
    assert comp.student.state_dict().keys() == eager.student.state_dict().keys()
    n_bn = len(comp.student.bn_layers())
    assert n_bn == len(eager.student.bn_layers())


def test_compile_uses_the_compiled_function(
    cfg_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_compile(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            calls.append(getattr(fn, "__name__", "?"))
            return fn(*a, **k)

        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    comp = build_components(load_config(cfg_path, ["compile=true"]))
    comp.synthesizer.synthesize(comp.student)
    comp.distiller.step(comp.synthesizer.sample(8))
    assert "forward_features" in calls
