"""Bad input, faults and untrusted files: each case has the message it must show."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_run import records, tiny_run_config
from typer.testing import CliRunner

import stars.synthesis.losses as synth_losses
from stars.cli import app
from stars.config import load_config
from stars.distill.checkpoint import load_state
from stars.distill.losses import kd_loss as real_kd_loss
from stars.errors import StarsError
from stars.models.io import save_model
from stars.models.teachers import build_teacher_arch
from stars.recipes.distill import run_distill

runner = CliRunner()


def config(tmp: Path, teacher: Path, **extra: Any) -> Path:
    """The tiny run (STARS off, evaluation off) with a small budget of non-finite steps."""
    distill = {
        "epochs": 3,
        "synthesis_steps_per_epoch": 1,
        "kd_steps_per_epoch": 2,
        "batch_size": 8,
        "max_bad_steps": 3,
    }
    return tiny_run_config(tmp, teacher, **({"name": "r", "distill": distill} | extra))


# ----------------------------------------------------------------------------- bad input


def test_image_size_the_student_cannot_take(tmp_path: Path, teacher_file: Path) -> None:
    small = tmp_path / "t8.safetensors"
    save_model(
        build_teacher_arch("resnet20", num_classes=10, image_size=8),
        small,
        {"kind": "teacher", "arch": "resnet20", "num_classes": 10, "image_size": 8},
    )
    cfg = config(
        tmp_path,
        small,
        data={
            "kind": "imagefolder",
            "root": str(tmp_path),
            "num_classes": 10,
            "image_size": 8,
            "test_dir": None,
        },
        student={"arch": "spiking_vgg16", "T": 2},
    )
    result = runner.invoke(app, ["distill", str(cfg)])
    assert result.exit_code == 2, result.output
    assert "student" in result.output and "image_size 8 is too small" in result.output
    assert not (tmp_path / "runs" / "r").exists(), "nothing is written for a bad config"


def test_teacher_class_count_mismatch(tmp_path: Path, teacher_file: Path) -> None:
    cfg = config(tmp_path, teacher_file, data={"kind": "cifar100", "root": str(tmp_path)})
    result = runner.invoke(app, ["distill", str(cfg)])
    assert result.exit_code == 2
    assert "num_classes=10" in result.output and "100" in result.output


def test_existing_run_directory_is_refused(tmp_path: Path, teacher_file: Path) -> None:
    (tmp_path / "runs" / "r").mkdir(parents=True)
    keep = tmp_path / "runs" / "r" / "notes.txt"
    keep.write_text("mine")
    result = runner.invoke(app, ["distill", str(config(tmp_path, teacher_file))])
    assert result.exit_code == 2
    assert "already exists" in result.output and "--overwrite" in result.output
    assert keep.read_text() == "mine"


def test_unwritable_output_directory(tmp_path: Path, teacher_file: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = config(tmp_path, teacher_file, output_dir=str(blocker / "runs"))
    result = runner.invoke(app, ["distill", str(cfg)])
    assert result.exit_code == 2
    assert "cannot write to run directory" in result.output


def test_yaml_cannot_execute_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert "YAML" in result.output
    assert not marker.exists()


# ----------------------------------------------------------------------------- untrusted files


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_convert_checkpoint_refuses_a_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, evil)
    out = tmp_path / "out.safetensors"
    result = runner.invoke(
        app,
        ["convert-checkpoint", str(evil), str(out), "--arch", "resnet20", "--num-classes", "10"],
    )
    assert result.exit_code == 2, result.output
    assert "weights_only" in result.output and "nothing in it was executed" in result.output
    assert not marker.exists() and not out.exists()


def test_convert_checkpoint_converts_a_state_dict(tmp_path: Path) -> None:
    model = build_teacher_arch("resnet20", num_classes=10)
    src = tmp_path / "good.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, src)
    out = tmp_path / "good.safetensors"
    result = runner.invoke(
        app, ["convert-checkpoint", str(src), str(out), "--arch", "resnet20", "--num-classes", "10"]
    )
    assert result.exit_code == 0, result.output
    cfg = config(tmp_path, out, distill={"epochs": 1, "kd_steps_per_epoch": 1, "batch_size": 8})
    assert run_distill(load_config(cfg), show_progress=False).run_dir.is_dir()
    wrong = runner.invoke(
        app,
        [
            "convert-checkpoint",
            str(src),
            str(tmp_path / "w.safetensors"),
            "--arch",
            "resnet32",
            "--num-classes",
            "10",
        ],
    )
    assert wrong.exit_code == 2 and "do not fit resnet32" in wrong.output


def test_pickle_teacher_is_refused_by_distill(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "teacher.pt"
    torch.save(_Payload(marker), evil)
    result = runner.invoke(app, ["distill", str(config(tmp_path, evil))])
    assert result.exit_code == 2
    assert "refusing a pickle-based checkpoint" in result.output
    assert "stars convert-checkpoint" in result.output
    assert not marker.exists()


# ----------------------------------------------------------------------------- faults


def test_non_finite_kd_steps_are_skipped_and_counted(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = real_kd_loss
    calls = {"n": 0}

    def sometimes_nan(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] in (2, 5) else out

    monkeypatch.setattr("stars.distill.distiller.kd_loss", sometimes_nan)
    result = run_distill(load_config(config(tmp_path, teacher_file)), show_progress=False)
    assert result.summary["skipped_kd_steps"] == 2
    epochs = records(result.run_dir, "epoch")
    assert [r["skipped_kd_steps"] for r in epochs] == [1, 1, 2]


def test_k_non_finite_kd_steps_in_a_row_stop_the_run(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = real_kd_loss
    calls = {"n": 0}

    def nan_from_epoch_2(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] > 2 else out

    monkeypatch.setattr("stars.distill.distiller.kd_loss", nan_from_epoch_2)
    cfg = config(tmp_path, teacher_file)
    result = runner.invoke(app, ["distill", str(cfg)])
    assert result.exit_code == 2
    assert "3 non-finite KD steps in a row at epoch 3" in result.output
    run = tmp_path / "runs" / "r"
    assert int(load_state(run / "checkpoint.safetensors")["epoch"]) == 2


def test_k_non_finite_synthesis_steps_stop_the_run(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = synth_losses.bn_matching

    def nan_bn(*args: Any, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = real(*args, **kwargs) * float("nan")
        return out

    monkeypatch.setattr(synth_losses, "bn_matching", nan_bn)
    cfg = config(
        tmp_path,
        teacher_file,
        distill={
            "epochs": 5,
            "synthesis_steps_per_epoch": 1,
            "kd_steps_per_epoch": 0,
            "batch_size": 8,
            "max_bad_steps": 3,
        },
    )
    result = runner.invoke(app, ["distill", str(cfg)])
    assert result.exit_code == 2
    assert "3 non-finite synthesis steps in a row at epoch 3" in result.output
    state = load_state(tmp_path / "runs" / "r" / "checkpoint.safetensors")
    assert state["epoch"] == 2 and state["extra"]["skipped_synthesis_steps"] == 2


def test_failed_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    writes = {"n": 0}

    def disk_full_on_second_checkpoint(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".checkpoint"):
            writes["n"] += 1
            if writes["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_on_second_checkpoint)
    with pytest.raises(StarsError, match=r"No space left on device.*previous checkpoint"):
        run_distill(load_config(config(tmp_path, teacher_file)), show_progress=False)
    run = tmp_path / "runs" / "r"
    assert int(load_state(run / "checkpoint.safetensors")["epoch"]) == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")], "temp file left behind"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signals_stop_cleanly_and_resume(
    tmp_path: Path, teacher_file: Path, sig: signal.Signals, code: int
) -> None:
    cfg = config(
        tmp_path,
        teacher_file,
        distill={
            "epochs": 40,
            "synthesis_steps_per_epoch": 1,
            "kd_steps_per_epoch": 1,
            "batch_size": 8,
        },
    )
    run = tmp_path / "runs" / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stars.cli", "distill", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 240
    while not (run / "checkpoint.safetensors").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out.decode()
    assert "--resume" in out.decode()
    done = int(load_state(run / "checkpoint.safetensors")["epoch"])
    assert 1 <= done < 40
    resumed = runner.invoke(
        app, ["distill", str(cfg), "--resume", str(run), "--set", "distill.epochs=41"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert "differences" in resumed.output and "are ignored" in resumed.output
    assert (run / "student.safetensors").is_file()


def test_undecodable_test_image_is_skipped_and_counted(
    tmp_path: Path, cifar_root: Path, teacher_file: Path
) -> None:
    import shutil

    data = tmp_path / "cifar"
    shutil.copytree(cifar_root, data)
    broken = sorted((data / "test").rglob("*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    cfg = config(
        tmp_path,
        teacher_file,
        data={"kind": "cifar10", "root": str(data)},
        distill={"epochs": 1, "kd_steps_per_epoch": 1, "batch_size": 8},
        evaluation={"enabled": True, "every_epochs": 1, "batch_size": 20},
    )
    with pytest.warns(UserWarning, match="skipping undecodable image"):
        result = run_distill(load_config(cfg), show_progress=False)
    assert result.summary["evaluation"]["skipped_images"] == 1
