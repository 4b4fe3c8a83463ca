"""End to end on a tiny config: run directory, resume after SIGKILL, CLI, ablate, evaluate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_run import STARS_ON, records, tiny_run_config
from typer.testing import CliRunner

from stars.cli import app
from stars.config import load_config
from stars.distill.checkpoint import load_state
from stars.recipes.distill import run_distill

runner = CliRunner()


def tiny_config(tmp: Path, cifar: Path, teacher: Path, **extra: object) -> Path:
    """The tiny run with STARS on, Fast's warm-up, a cosine schedule and evaluation."""
    sections: dict[str, object] = {
        "stars": STARS_ON,
        "distill": {
            "epochs": 4,
            "synthesis_steps_per_epoch": 1,
            "kd_steps_per_epoch": 3,
            "batch_size": 8,
            "optimizer": {"lr": 0.05},
            "schedule": {"kind": "cosine", "warmup_epochs": 1},
        },
        "evaluation": {"every_epochs": 2, "batch_size": 20, "max_images": 20},
    }
    return tiny_run_config(
        tmp, teacher, data_root=cifar, file="tiny.yaml", warmup_epochs=1, **(sections | extra)
    )


def test_run_directory_is_complete(tmp_path: Path, cifar_root: Path, teacher_file: Path) -> None:
    cfg = load_config(tiny_config(tmp_path, cifar_root, teacher_file))
    result = run_distill(cfg, show_progress=False)
    run = result.run_dir
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.safetensors",
        "student.safetensors",
        "student.json",
        "synthetic_grid.png",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == cfg
    calib = records(run, "calibration")
    assert len(calib) == 1
    assert calib[0]["grad_norm/bn"] > 0 and calib[0]["ratio/tar"] > 0 and "ratio/rca" in calib[0]
    epochs = records(run, "epoch")
    evals = records(run, "eval")
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert [r["epoch"] for r in evals] == [2, 4]
    for term in ("bn", "oh", "tar", "rca", "total"):
        assert f"synthesis/{term}" in epochs[-1]
    assert "kd/kd" in epochs[-1] and "kd/rca" in epochs[-1]
    assert "kd/kd" not in epochs[0], "no KD during Fast's warm-up epoch"
    assert epochs[-1]["bank_size"] == 32
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["student_top1"] <= 100.0
    assert summary["evaluation"]["student_energy_uj"] > 0
    assert summary["evaluation"]["skipped_images"] == 0
    assert set(summary["evaluation"]["firing_rates"])
    meta = json.loads((run / "student.json").read_text())
    assert meta["arch"] == "spiking_tiny" and meta["T"] == 2
    with Image.open(run / "synthetic_grid.png") as img:
        assert img.width > 32 and img.height > 32
    # the same run name again is refused: nothing is lost
    with pytest.raises(Exception, match="already exists"):
        run_distill(cfg, show_progress=False)


def test_resume_after_sigkill_matches_uninterrupted(
    tmp_path: Path, cifar_root: Path, teacher_file: Path
) -> None:
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    cfg = load_config(tiny_config(ref_dir, cifar_root, teacher_file))
    reference = run_distill(cfg, show_progress=False).summary

    kill_dir = tmp_path / "kill"
    kill_dir.mkdir()
    cfg_path = tiny_config(kill_dir, cifar_root, teacher_file)
    run = kill_dir / "runs" / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stars.cli", "distill", str(cfg_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.time() + 240
        while not (run / "checkpoint.safetensors").exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"the run ended before its first checkpoint: {err[-2000:]}")
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = int(load_state(run / "checkpoint.safetensors")["epoch"])
    assert 1 <= done < 4, "the kill must land mid-run"
    resumed = run_distill(load_config(cfg_path), resume=run, show_progress=False).summary
    assert resumed["student_top1"] == reference["student_top1"]
    assert resumed["evaluation"] == reference["evaluation"]
    from safetensors.torch import load_file

    a = load_file(str(ref_dir / "runs" / "tiny" / "student.safetensors"))
    b = load_file(str(run / "student.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in records(run, "epoch")] == [1, 2, 3, 4]


def test_cli_exit_codes(tmp_path: Path, cifar_root: Path, teacher_file: Path) -> None:
    cfg = tiny_config(tmp_path, cifar_root, teacher_file)
    bad = runner.invoke(app, ["distill", str(cfg), "--set", "student.T=0"])
    assert bad.exit_code == 2 and "student.T" in bad.output
    missing = runner.invoke(app, ["distill", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2
    no_ckpt = runner.invoke(app, ["distill", str(cfg), "--resume", str(tmp_path)])
    assert no_ckpt.exit_code == 2 and "nothing to resume" in no_ckpt.output
    wrong_teacher = runner.invoke(
        app, ["distill", str(cfg), "--set", "teacher.arch=resnet32", "--overwrite"]
    )
    assert wrong_teacher.exit_code == 2 and "resnet20" in wrong_teacher.output
    ok = runner.invoke(app, ["distill", str(cfg), "--set", "distill.epochs=2", "--set", "name=cli"])
    assert ok.exit_code == 0, ok.output
    student = tmp_path / "runs" / "cli" / "student.safetensors"
    assert student.is_file()
    ev = runner.invoke(app, ["evaluate", str(student), "--device", "cpu"])
    assert ev.exit_code == 0, ev.output
    assert "top-1" in ev.output and "firing rate" in ev.output


def test_no_test_data_is_said_plainly(tmp_path: Path, cifar_root: Path, teacher_file: Path) -> None:
    cfg = load_config(
        tiny_config(tmp_path, cifar_root, teacher_file),
        ["data.root=" + str(tmp_path / "nowhere"), "distill.epochs=1", "synthesis.warmup_epochs=0"],
    )
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    result = run_distill(cfg, console=Console(file=buf, width=200), show_progress=False)
    assert "Evaluation is skipped" in buf.getvalue()
    assert result.summary["student_top1"] is None
    assert (result.run_dir / "student.safetensors").is_file()


def test_synthesize_command_writes_images(
    tmp_path: Path, cifar_root: Path, teacher_file: Path
) -> None:
    cfg = tiny_config(tmp_path, cifar_root, teacher_file)
    out = tmp_path / "synth"
    result = runner.invoke(app, ["synthesize", str(cfg), "--num", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 10
    assert (out / "grid.png").is_file()


def test_ablate_writes_table(tmp_path: Path, cifar_root: Path, teacher_file: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        cifar_root,
        teacher_file,
        distill={
            "epochs": 1,
            "synthesis_steps_per_epoch": 1,
            "kd_steps_per_epoch": 1,
            "batch_size": 8,
        },
    )
    out = tmp_path / "abl"
    result = runner.invoke(
        app,
        ["ablate", str(cfg), "--variants", "baseline,stars", "--seeds", "2", "--out", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    table = json.loads((out / "ablation.json").read_text())
    assert [v["variant"] for v in table["variants"]] == ["baseline", "stars"]
    assert all(v["seeds"] == 2 and len(v["top1"]) == 2 for v in table["variants"])
    md = (out / "ablation.md").read_text()
    assert "| baseline |" in md and "| stars |" in md
    runs = {r["run_dir"] for r in table["runs"]}
    assert len(runs) == 4
    bad = runner.invoke(app, ["ablate", str(cfg), "--variants", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_validation_split_is_fixed_training_images(
    tmp_path: Path, cifar_root: Path, teacher_file: Path
) -> None:
    from rich.console import Console

    from stars.pipeline import test_loader

    cfg = load_config(
        tiny_config(tmp_path, cifar_root, teacher_file),
        ["evaluation.split=val", "evaluation.val_size=12", "evaluation.max_images=null"],
    )
    quiet = Console(quiet=True)
    a = torch.cat([x for x, _ in test_loader(cfg, quiet) or []])
    b = torch.cat([x for x, _ in test_loader(cfg.model_copy(update={"seed": 5}), quiet) or []])
    assert a.shape[0] == 12 and torch.equal(a, b), "the same images for every run and seed"
    test = torch.cat(
        [
            x
            for x, _ in test_loader(
                load_config(
                    tiny_config(tmp_path, cifar_root, teacher_file), ["evaluation.max_images=null"]
                ),
                quiet,
            )
            or []
        ]
    )
    assert not any(torch.equal(v, t) for v in a for t in test), (
        "validation images are not test images"
    )


@pytest.mark.parametrize("first", [True, False])
def test_deepinversion_synthesizes_first_or_interleaved(
    tmp_path: Path, cifar_root: Path, teacher_file: Path, first: bool
) -> None:
    """DeepInversion's protocol fills the bank before any KD step; ``synthesize_first:
    false`` adds the epoch's batches before its KD steps, as Fast does. Same budget."""
    path = tiny_config(
        tmp_path,
        cifar_root,
        teacher_file,
        synthesis={
            "kind": "deepinversion",
            "batch_size": 8,
            "iterations": 2,
            "memory_size": 64,
            "synthesize_first": first,
        },
        evaluation={"enabled": False},
    )
    result = run_distill(load_config(path), show_progress=False)
    epochs = records(result.run_dir, "epoch")
    assert [r["bank_size"] for r in epochs] == ([32] * 4 if first else [8, 16, 24, 32])
    synthesized = [r["epoch"] for r in epochs if "synthesis/bn" in r]
    assert synthesized == ([1] if first else [1, 2, 3, 4])
    assert all("kd/kd" in r for r in epochs), "no warm-up: KD from the first epoch"
