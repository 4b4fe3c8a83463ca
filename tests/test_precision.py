"""precision (bf16 autocast), channels_last and compile options, on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from stars.config import load_config
from stars.pipeline import build_components, run_distill


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> Path:
    tmp = tmp_path_factory.mktemp("prec")
    teacher = teacher_file
    tree = {
        "device": "cpu",
        "output_dir": str(tmp / "runs"),
        "data": {"kind": "cifar10", "root": str(tmp / "none")},
        "teacher": {"arch": "resnet20", "checkpoint": str(teacher)},
        "student": {"arch": "spiking_tiny", "T": 2},
        "synthesis": {
            "kind": "fast",
            "batch_size": 8,
            "g_steps": 2,
            "nz": 16,
            "memory_size": 64,
            "warmup_epochs": 0,
        },
        "stars": {"rca": {"weight": 0.1, "student_weight": 0.5}, "tar": {"weight": 5.0}},
        "distill": {"epochs": 2, "kd_steps_per_epoch": 2, "batch_size": 8},
        "evaluation": {"enabled": False},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _epochs(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "epoch"]


def test_bf16_and_channels_last_run_on_cpu(cfg_path: Path) -> None:
    cfg = load_config(cfg_path, ["precision=bf16", "channels_last=true", "name=bf16"])
    comp = build_components(cfg)
    conv = next(m for m in comp.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    result = run_distill(cfg, show_progress=False)
    records = _epochs(result.run_dir)
    assert len(records) == 2
    assert all(math.isfinite(v) for r in records for k, v in r.items() if k.startswith("kd/"))
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
    n_bn = len(comp.student.bn_layers())  # type: ignore[operator]
    assert n_bn == len(eager.student.bn_layers())  # type: ignore[operator]


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
