"""``stars config validate`` accepts every shipped config as it is, teacher configs included."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stars.cli import app
from stars.config import ConfigError, RunConfig, TeacherTrainConfig, load_any_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
runner = CliRunner()


def test_configs_are_found() -> None:
    assert len(SHIPPED) >= 10
    assert any("teacher" in p.name for p in SHIPPED) and any("distill" in p.name for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_shipped_config_validates_without_flags(path: Path) -> None:
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    cfg = load_any_config(path)
    is_teacher = "train" in (yaml.safe_load(path.read_text()) or {})
    assert isinstance(cfg, TeacherTrainConfig if is_teacher else RunConfig)


def test_config_show_recognises_a_teacher_config() -> None:
    path = CONFIGS / "teacher_resnet20_cifar10.yaml"
    result = runner.invoke(app, ["config", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert "'train'" in result.output


def test_the_teacher_flag_still_forces_the_teacher_schema(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["config", "validate", str(CONFIGS / "quickstart.yaml"), "--teacher"]
    )
    assert result.exit_code == 2 and "unknown key" in result.output


def test_an_override_can_make_a_teacher_config(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("seed: 1\n")
    assert isinstance(load_any_config(path), RunConfig)
    assert isinstance(load_any_config(path, ["train.epochs=3"]), TeacherTrainConfig)


def test_sections_of_both_kinds_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("train: {epochs: 2}\nstudent: {T: 2}\ndistill: {epochs: 1}\n")
    with pytest.raises(
        ConfigError, match=r"teacher-training config \(train\).*\(distill, student\)"
    ):
        load_any_config(path)
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2 and "one or the other" in result.output


def test_a_bad_teacher_config_names_its_field(tmp_path: Path) -> None:
    path = tmp_path / "teacher.yaml"
    path.write_text("train: {epochs: 0}\n")
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2 and "train.epochs" in result.output
