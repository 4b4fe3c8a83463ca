"""`stars synthesize`: a balanced ImageFolder set with its quality report, synthesized to the
method's budget or exported from a run's memory bank; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from rich.console import Console
from tiny_run import tiny_run_config
from torchvision.datasets import ImageFolder
from typer.testing import CliRunner

import stars.recipes.synthesize as synth_cmd
from stars.cli import app
from stars.config import TeacherTrainConfig, load_config
from stars.data.classes import CIFAR10_CLASSES
from stars.distill.checkpoint import load_state, save_state
from stars.errors import StarsError
from stars.models.io import save_model
from stars.models.teachers import build_teacher_arch
from stars.recipes.distill import run_distill
from stars.recipes.evaluate import evaluate_checkpoint
from stars.synthesis.protocols import SynthesisStep

runner = CliRunner()
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CIFAR-10 ResNet-20 with the metadata `stars evaluate` needs."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    meta = {
        "kind": "teacher",
        "arch": "resnet20",
        "num_classes": 10,
        "image_size": 32,
        "config": TeacherTrainConfig().model_dump(mode="json"),
    }
    save_model(build_teacher_arch("resnet20", num_classes=10), path, meta)
    return path


def _config(tmp: Path, teacher: Path, **sections: Any) -> Path:
    """Fast, 8 images a batch, 2 generator steps, one warm-up epoch of 1 batch."""
    return tiny_run_config(tmp, teacher, warmup_epochs=1, **sections)


def _nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_synthesize_writes_a_balanced_imagefolder_with_its_report(
    tmp_path: Path, teacher: Path
) -> None:
    cfg = _config(tmp_path, teacher)
    out = tmp_path / "set"
    result = runner.invoke(app, ["synthesize", str(cfg), "--num", "13", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "remainder 3: one more for airplane, automobile, bird" in text
    assert "teacher agreement with intended labels" in text

    ds = ImageFolder(str(out / "images"))
    assert ds.classes == list(CIFAR10_CLASSES)
    counts = torch.bincount(torch.tensor(ds.targets), minlength=10).tolist()
    assert counts == [2, 2, 2] + [1] * 7

    q = json.loads((out / "quality.json").read_text())
    assert q["num_images"] == 13 and q["counts"] == dict(zip(CIFAR10_CLASSES, counts, strict=True))
    assert q["budget"]["warmup_batches"] == 1 and q["budget"]["steps_per_batch"] == 2
    assert q["batches"] == 2 and q["dropped_images"] == 2 * 8 - 13
    assert 0.0 <= q["teacher_agreement"] <= 100.0 and 0.1 <= q["teacher_confidence"] <= 1.0
    n_bn = len(build_teacher_arch("resnet20", num_classes=10).bn_layers())
    assert q["bn_loss"] > 0 and len(q["bn_loss_per_layer"]) == n_bn
    assert 0.0 <= q["diversity_overall"] <= 2.0 and q["diversity_within_class"] is not None
    with Image.open(out / "grid.png") as grid:
        assert grid.getpixel((0, 0)) == (255, 255, 255)  # the names' margin

    # `stars evaluate` on the folder: its top-1 is the report's agreement, exactly
    ev = evaluate_checkpoint(teacher, data=out, device="cpu", max_images=None, console=QUIET)
    assert ev["top1"] == q["teacher_agreement"]
    shown = runner.invoke(app, ["evaluate", str(teacher), "--data", str(out), "--device", "cpu"])
    assert shown.exit_code == 0 and f"{q['teacher_agreement']:.2f}" in shown.output

    # a set that lost a class folder is refused, naming the folder and both counts
    (out / "images" / "airplane").rename(tmp_path / "airplane")
    shown = runner.invoke(app, ["evaluate", str(teacher), "--data", str(out), "--device", "cpu"])
    assert shown.exit_code == 2, shown.output
    text = "".join(shown.output.split())
    assert "9classfolders,themodelhas10classes" in text and "images" in text


class _Spy:
    """Wraps the synthesizer the command builds: counts calls, and may relabel steps."""

    def __init__(self, inner: Any, relabel: Any = None) -> None:
        self.inner, self.relabel, self.calls = inner, relabel, 0
        self.ctx = inner.ctx

    def synthesize(self, student: Any) -> SynthesisStep:
        self.calls += 1
        step: SynthesisStep = self.inner.synthesize(student)
        if self.relabel is not None:
            step = replace(step, labels=self.relabel(self.calls, step.labels))
        return step


def _spy_on(monkeypatch: pytest.MonkeyPatch, relabel: Any = None) -> list[_Spy]:
    made: list[_Spy] = []
    real = synth_cmd.synthesizer_for  # type: ignore[attr-defined]

    def build(*args: Any, **kwargs: Any) -> Any:
        made.append(_Spy(real(*args, **kwargs), relabel))
        return made[-1]

    monkeypatch.setattr(synth_cmd, "synthesizer_for", build)
    return made


def test_fast_runs_its_warmup_then_scaled_steps(
    tmp_path: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(_config(tmp_path, teacher, distill={"synthesis_steps_per_epoch": 2}))
    made = _spy_on(monkeypatch)
    result = synth_cmd.synthesize_dataset(
        cfg, num=20, out=tmp_path / "set", steps=1.5, console=QUIET
    )
    spy = made[0]
    assert spy.inner.g_steps == 3  # round(2 x 1.5)
    assert spy.calls == 3 + math.ceil(20 / 8)  # ceil(1 epoch x 2 batches x 1.5) warm-up
    assert result.record["budget"]["warmup_batches"] == 3
    assert [c.count for c in result.report.per_class] == [2] * 10


def test_deepinversion_is_balanced_too(tmp_path: Path, teacher: Path) -> None:
    synthesis = {"kind": "deepinversion", "batch_size": 8, "iterations": 2, "memory_size": 64}
    cfg = load_config(_config(tmp_path, teacher, synthesis=synthesis))
    result = synth_cmd.synthesize_dataset(cfg, num=11, out=tmp_path / "set", console=QUIET)
    assert [c.count for c in result.report.per_class] == [2] + [1] * 9
    assert result.record["budget"]["steps_per_batch"] == 2


def test_a_method_that_labels_its_own_images_fills_the_quotas(
    tmp_path: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels the synthesizer ignores (DAFL/DFAD use the teacher's argmax): each class is
    filled from what comes; a class that never comes is an error, and nothing is written."""
    cfg = load_config(_config(tmp_path, teacher))
    _spy_on(monkeypatch, lambda call, y: (torch.arange(8) + 3 * call) % 10)
    done = synth_cmd.synthesize_dataset(cfg, num=30, out=tmp_path / "ok", console=QUIET)
    assert [c.count for c in done.report.per_class] == [3] * 10

    _spy_on(monkeypatch, lambda call, y: torch.zeros(8, dtype=torch.long))
    with pytest.raises(StarsError, match=r"left classes short: automobile \(0 of 1\)"):
        synth_cmd.synthesize_dataset(cfg, num=10, out=tmp_path / "short", console=QUIET)
    _nothing_written(tmp_path, tmp_path / "short")


def test_export_from_a_run_writes_its_bank(tmp_path: Path, teacher: Path) -> None:
    cfg = load_config(
        _config(tmp_path, teacher, distill={"epochs": 3, "kd_steps_per_epoch": 1, "batch_size": 8})
    )
    run = run_distill(cfg, show_progress=False, console=QUIET).run_dir
    with Image.open(run / "synthetic_grid.png") as grid:
        assert grid.getpixel((0, 0)) == (255, 255, 255)  # distill's grid is named too
    bank = load_state(run / "checkpoint.safetensors")["synthesizer"]["ctx"]["bank"]
    out = tmp_path / "bank"
    result = runner.invoke(app, ["synthesize", "--from-run", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ds = ImageFolder(str(out / "images"), allow_empty=True)
    assert sorted(ds.targets) == sorted(bank["labels"].tolist())
    q = json.loads((out / "quality.json").read_text())
    assert q["source"] == "run" and q["num_images"] == bank["pixels"].shape[0] == 24

    have = torch.bincount(bank["labels"], minlength=10)
    m = int(have.min())
    x = tmp_path / "x"
    too_many = runner.invoke(
        app, ["synthesize", "--from-run", str(run), "--num", str(10 * (m + 1)), "--out", str(x)]
    )
    assert too_many.exit_code == 2 and "too few images" in too_many.output
    _nothing_written(tmp_path, x)
    if m >= 1:
        sub = synth_cmd.export_run(run, out=tmp_path / "sub", num=10 * m, console=QUIET)
        assert [c.count for c in sub.report.per_class] == [m] * 10


def test_a_run_without_a_bank_is_refused(tmp_path: Path, teacher: Path) -> None:
    cfg = load_config(_config(tmp_path, teacher, distill={"epochs": 1, "kd_steps_per_epoch": 1}))
    run = run_distill(cfg, show_progress=False, console=QUIET).run_dir
    state = load_state(run / "checkpoint.safetensors")
    state["synthesizer"]["ctx"]["bank"] = {
        "pixels": torch.empty(0, dtype=torch.uint8),
        "labels": torch.empty(0, dtype=torch.long),
    }
    save_state(run / "checkpoint.safetensors", state)
    out = tmp_path / "set"
    empty = runner.invoke(app, ["synthesize", "--from-run", str(run), "--out", str(out)])
    assert empty.exit_code == 2 and "memory bank" in empty.output and "empty" in empty.output
    (run / "checkpoint.safetensors").unlink()
    gone = runner.invoke(app, ["synthesize", "--from-run", str(run), "--out", str(out)])
    assert gone.exit_code == 2 and "no checkpoint.safetensors" in gone.output
    nowhere = runner.invoke(app, ["synthesize", "--from-run", str(tmp_path), "--out", str(out)])
    assert nowhere.exit_code == 2 and "no config.yaml" in nowhere.output
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num", "0"], "--num must be at least the number of classes (10)"),
        (["--num", "7"], "got 7"),
        (["--steps", "0"], "--steps must be a positive number"),
        (["--from-run", "RUNS"], "drop CONFIG"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    tmp_path: Path, teacher: Path, args: list[str], message: str
) -> None:
    cfg = _config(tmp_path, teacher)
    out = tmp_path / "set"
    args = [a.replace("RUNS", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["synthesize", str(cfg), *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    _nothing_written(tmp_path, out)


def test_no_config_and_no_run_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synthesize", "--out", str(tmp_path / "set")])
    assert result.exit_code == 2 and "give a run CONFIG" in result.output


def test_out_is_never_half_written_nor_clobbered(
    tmp_path: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, teacher)
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    bad = runner.invoke(app, ["synthesize", str(cfg), "--out", str(blocker / "set")])
    assert bad.exit_code == 2 and "cannot write there" in bad.output

    out = tmp_path / "set"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused = runner.invoke(app, ["synthesize", str(cfg), "--num", "10", "--out", str(out)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the report failed")

    with monkeypatch.context() as m:
        m.setattr(synth_cmd, "quality_report", broken)
        failed = runner.invoke(
            app, ["synthesize", str(cfg), "--num", "10", "--out", str(out), "--overwrite"]
        )
    assert isinstance(failed.exception, RuntimeError)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # the old set is intact
    _nothing_written(tmp_path, tmp_path / "fresh")

    done = runner.invoke(
        app, ["synthesize", str(cfg), "--num", "10", "--out", str(out), "--overwrite"]
    )
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "quality.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".set.")] == []
