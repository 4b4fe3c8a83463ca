"""Data-parallel distillation under torchrun (gloo, 2 CPU processes) on a tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_run import STARS_ON, records, tiny_run_config

from stars.config import load_config
from stars.distill.checkpoint import load_state
from stars.recipes.distill import run_distill


def _config(tmp: Path, cifar: Path, teacher: Path, name: str) -> Path:
    return tiny_run_config(
        tmp,
        teacher,
        data_root=cifar,
        file=f"{name}.yaml",
        name=name,
        stars=STARS_ON,
        distill={"epochs": 3, "kd_steps_per_epoch": 3, "batch_size": 8, "optimizer": {"lr": 0.05}},
        evaluation={"every_epochs": 3, "batch_size": 20, "max_images": 20},
    )


def _torchrun(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "stars.cli",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp)


def test_two_processes_match_each_other_and_the_single_process_run(
    tmp_path: Path, cifar_root: Path, teacher_file: Path
) -> None:
    cfg = _config(tmp_path, cifar_root, teacher_file, "ddp")
    done = _torchrun(["distill", str(cfg)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2
    # Both ranks end with identical weights and BN buffers (gradients averaged by DDP,
    # buffers broadcast from rank 0 each epoch).
    assert summary["max_rank_difference"] == 0.0
    epochs = records(run, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    # every rank's share lands in every bank: 8 images per epoch in all
    assert [r["bank_size"] for r in epochs] == [8, 16, 24]
    state = load_state(run / "checkpoint.safetensors")
    assert state["world"] == 2 and len(state["ranks"]) == 2

    single = run_distill(
        load_config(_config(tmp_path, cifar_root, teacher_file, "single")), show_progress=False
    ).summary
    # Not bitwise equal: each rank synthesizes its half of a batch with its own seed.
    # Stated tolerance: the KD loss averaged over the epochs is within 25% of the
    # single-process run's (measured: 0.682 vs 0.674), and the teacher accuracy is the same.
    single_kd = [r["kd/kd"] for r in records(tmp_path / "runs" / "single", "epoch")]
    ddp_kd = [r["kd/kd"] for r in epochs]
    assert abs(sum(ddp_kd) / 3 - sum(single_kd) / 3) <= 0.25 * sum(single_kd) / 3
    assert summary["teacher_top1"] == single["teacher_top1"]


def test_resume_under_torchrun_and_world_size_check(
    tmp_path: Path, cifar_root: Path, teacher_file: Path
) -> None:
    cfg = _config(tmp_path, cifar_root, teacher_file, "ddp")
    first = _torchrun(["distill", str(cfg), "--set", "distill.epochs=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    # A single process cannot resume a 2-process checkpoint: clear message, exit 2.
    from typer.testing import CliRunner

    from stars.cli import app

    wrong = CliRunner().invoke(app, ["distill", str(cfg), "--resume", str(run)])
    assert wrong.exit_code == 2 and "same number" in wrong.output
    again = _torchrun(["distill", str(cfg), "--resume", str(run)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["max_rank_difference"] == 0.0
