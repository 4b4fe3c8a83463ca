"""``stars train-teacher`` end to end on a 40-image CIFAR-10 subset (one short epoch, CPU)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from stars.cli import app
from stars.config import TeacherTrainConfig, load_teacher_config
from stars.data.datasets import CIFAR10_MEAN, CIFAR10_STD, build_data
from stars.errors import StarsError
from stars.evaluation import top1
from stars.models.io import load_model_weights, read_metadata
from stars.models.teachers import build_teacher_arch
from stars.recipes.train_teacher import TeacherResult, train_teacher

EPOCHS = 1


def _tree(root: Path, out: Path, name: str) -> dict[str, Any]:
    return {
        "seed": 0,
        "device": "cpu",
        "output_dir": str(out),
        "name": name,
        "data": {"kind": "cifar10", "root": str(root)},
        "teacher": {"arch": "resnet20"},
        "train": {"epochs": EPOCHS, "batch_size": 16},
        "evaluation": {"batch_size": 64},
    }


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=100)


@dataclass(frozen=True)
class Trained:
    cfg: TeacherTrainConfig
    result: TeacherResult


@pytest.fixture(scope="module")
def trained(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    out = tmp_path_factory.mktemp("teacher-runs")
    cfg = TeacherTrainConfig.model_validate(_tree(cifar_root, out, "r20"))
    return Trained(cfg, train_teacher(cfg, console=_quiet()))


def test_run_directory_layout(trained: Trained) -> None:
    run = trained.result.run_dir
    assert run == trained.cfg.output_dir / "r20"
    names = {p.name for p in run.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "teacher.safetensors",
        "teacher.json",
        "summary.json",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert trained.result.weights == run / "teacher.safetensors"


def test_config_yaml_is_the_resolved_config(trained: Trained) -> None:
    path = trained.result.run_dir / "config.yaml"
    assert load_teacher_config(path) == trained.cfg
    assert yaml.safe_load(path.read_text())["train"]["epochs"] == EPOCHS


def test_metrics_jsonl(trained: Trained) -> None:
    lines = (trained.result.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == EPOCHS
    last = records[-1]
    assert last["epoch"] == EPOCHS
    assert isinstance(last["loss"], float)
    assert last["loss"] > 0
    assert 0.0 <= last["test_top1"] <= 100.0
    assert last["test_top1"] == trained.result.test_top1


def test_weights_metadata(trained: Trained) -> None:
    meta = json.loads((trained.result.run_dir / "teacher.json").read_text())
    assert meta["arch"] == "resnet20"
    assert meta["num_classes"] == 10
    assert meta["image_size"] == 32
    assert meta["dataset"] == "cifar10"
    assert meta["mean"] == pytest.approx(list(CIFAR10_MEAN))
    assert meta["std"] == pytest.approx(list(CIFAR10_STD))
    assert meta["test_top1"] == trained.result.test_top1
    assert meta["epochs"] == EPOCHS
    # the safetensors header carries the same metadata
    (trained.result.run_dir / "teacher.json").rename(trained.result.run_dir / "moved.json")
    try:
        assert read_metadata(trained.result.weights) == meta
    finally:
        (trained.result.run_dir / "moved.json").rename(trained.result.run_dir / "teacher.json")


def test_summary_json(trained: Trained) -> None:
    summary = json.loads((trained.result.run_dir / "summary.json").read_text())
    assert summary["test_top1"] == trained.result.test_top1
    assert Path(summary["weights"]) == trained.result.weights
    assert summary["seconds"] > 0


def test_weights_reproduce_the_recorded_accuracy(trained: Trained) -> None:
    model = build_teacher_arch("resnet20", num_classes=10)
    meta = load_model_weights(
        model, trained.result.weights, expect={"arch": "resnet20", "num_classes": 10}
    )
    test = build_data(trained.cfg.data).test()
    assert test is not None
    acc = top1(model, DataLoader(test, batch_size=64), torch.device("cpu"))
    # 40 test images: one image is 2.5 points; allow one flipped near-tie, expect equality
    assert acc == pytest.approx(meta["test_top1"], abs=2.5 + 1e-6)
    assert trained.result.test_top1 is not None


def test_second_run_into_the_same_name_is_refused(trained: Trained) -> None:
    run = trained.result.run_dir
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(StarsError, match="already exists") as info:
        train_teacher(trained.cfg, console=_quiet())
    assert "overwrite" in str(info.value)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_overwrite_starts_a_fresh_metrics_log(cifar_root: Path, tmp_path: Path) -> None:
    tree = _tree(cifar_root, tmp_path, "again")
    tree["train"]["max_train_images"] = 16
    tree["evaluation"] |= {"enabled": False}
    cfg = TeacherTrainConfig.model_validate(tree)
    first = train_teacher(cfg, console=_quiet())
    assert first.test_top1 is None
    second = train_teacher(cfg, overwrite=True, console=_quiet())
    assert second.run_dir == first.run_dir
    lines = (second.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS, "metrics of the replaced run must not remain"
    assert json.loads((second.run_dir / "teacher.json").read_text())["test_top1"] is None


def test_cli_train_teacher(cifar_root: Path, tmp_path: Path) -> None:
    tree = _tree(cifar_root, tmp_path, "from-yaml")
    tree["train"]["epochs"] = 3
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump(tree))
    runner = CliRunner()
    args = [
        "train-teacher",
        str(config),
        "--set",
        "train.epochs=1",
        "--set",
        "train.max_train_images=16",
        "--set",
        "evaluation.max_images=8",
        "--set",
        "name=cli-run",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "cli-run"
    assert (run / "teacher.safetensors").is_file()
    assert read_metadata(run / "teacher.safetensors")["epochs"] == 1
    assert not (tmp_path / "from-yaml").exists()

    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "already exists" in again.output


@pytest.mark.parametrize(
    ("override", "field"),
    [("train.epochs=0", "train.epochs"), ("teacher.arch=resnet99", "teacher.arch")],
)
def test_cli_bad_set_exits_2_naming_the_field(
    cifar_root: Path, tmp_path: Path, override: str, field: str
) -> None:
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump(_tree(cifar_root, tmp_path, "bad")))
    result = CliRunner().invoke(app, ["train-teacher", str(config), "--set", override])
    assert result.exit_code == 2
    assert field in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()


def test_cli_evaluate_teacher(trained: Trained, cifar_root: Path) -> None:
    weights = trained.result.weights
    result = CliRunner().invoke(
        app, ["evaluate", str(weights), "--data", str(cifar_root), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "MACs / image" in result.output
    recorded = read_metadata(weights)["test_top1"]
    import re

    match = re.search(r"top-1 \(%\)\s*│\s*([0-9.]+)", result.output)
    assert match is not None, result.output
    assert float(match.group(1)) == pytest.approx(recorded, abs=2.5 + 1e-6)
    missing = CliRunner().invoke(
        app, ["evaluate", str(weights), "--data", str(cifar_root / "nope"), "--device", "cpu"]
    )
    assert missing.exit_code == 2 and "--data PATH" in missing.output


def test_init_from_starts_at_the_given_weights(trained: Trained, cifar_root: Path) -> None:
    """With a vanishing learning rate, every parameter must stay at the init_from file's."""
    tree = _tree(cifar_root, trained.cfg.output_dir, "restart")
    tree["train"] |= {
        "max_train_images": 16,
        "init_from": str(trained.result.weights),
        "optimizer": {"kind": "sgd", "lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0},
    }
    tree["evaluation"] |= {"enabled": False}
    result = train_teacher(TeacherTrainConfig.model_validate(tree), console=_quiet())
    start = build_teacher_arch("resnet20", num_classes=10)
    load_model_weights(start, trained.result.weights)
    after = build_teacher_arch("resnet20", num_classes=10)
    meta = load_model_weights(after, result.weights)
    for (name, p0), (_, p1) in zip(start.named_parameters(), after.named_parameters(), strict=True):
        torch.testing.assert_close(p0, p1, rtol=0, atol=1e-8, msg=name)
    assert meta["init_from"] == str(trained.result.weights)
    assert meta["epochs"] == 2 * EPOCHS  # the earlier run's epochs plus this one's


def test_init_from_a_mismatched_checkpoint_exits_2(
    trained: Trained, cifar_root: Path, tmp_path: Path
) -> None:
    tree = _tree(cifar_root, tmp_path, "mismatch")
    tree["teacher"] = {"arch": "resnet32"}
    tree["train"]["init_from"] = str(trained.result.weights)
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["train-teacher", str(config)])
    assert result.exit_code == 2
    assert "arch='resnet20'" in result.output and "resnet32" in result.output
    assert not (tmp_path / "mismatch").exists(), "a refused run must not leave a directory"


def test_swa_saves_the_average_and_evaluates_it(cifar_root: Path, tmp_path: Path) -> None:
    tree = _tree(cifar_root, tmp_path, "swa")
    tree["train"] |= {"epochs": 3, "max_train_images": 16, "swa": {"start_epoch": 1}}
    result = train_teacher(TeacherTrainConfig.model_validate(tree), console=_quiet())
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["swa_averaged_epochs"] == 2
    assert records[-1]["lr"] == pytest.approx(0.01)  # annealed to swa.lr
    meta = read_metadata(result.weights)
    assert meta["swa"] == {"start_epoch": 1, "lr": 0.01, "anneal_epochs": 1}
    model = build_teacher_arch("resnet20", num_classes=10)
    load_model_weights(model, result.weights)
    test = build_data(TeacherTrainConfig.model_validate(tree).data).test()
    assert test is not None
    acc = top1(model, DataLoader(test, batch_size=64), torch.device("cpu"))
    assert acc == pytest.approx(result.test_top1, abs=2.5 + 1e-6)


def test_swa_start_after_the_last_epoch_exits_2(cifar_root: Path, tmp_path: Path) -> None:
    tree = _tree(cifar_root, tmp_path, "swa-late")
    tree["train"]["swa"] = {"start_epoch": EPOCHS}
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["train-teacher", str(config)])
    assert result.exit_code == 2
    assert "train.swa.start_epoch" in result.output
    assert not (tmp_path / "swa-late").exists()
