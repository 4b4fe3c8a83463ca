"""The distill recipe's phases called one by one, and the run-directory module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import STARS_ON, tiny_run_config

from stars import run_dir
from stars.config import load_config
from stars.errors import StarsError
from stars.recipes.distill import DistillRecipe, run_distill


def _config(tmp: Path, teacher: Path, name: str) -> Path:
    return tiny_run_config(
        tmp,
        teacher,
        file=f"{name}.yaml",
        warmup_epochs=1,
        name=name,
        stars=STARS_ON,
        distill={"epochs": 3, "kd_steps_per_epoch": 2, "batch_size": 8},
    )


def test_phases_by_hand_are_the_run(tmp_path: Path, teacher_file: Path) -> None:
    whole = run_distill(load_config(_config(tmp_path, teacher_file, "whole")), show_progress=False)

    recipe = DistillRecipe(load_config(_config(tmp_path, teacher_file, "phases")))
    comp = recipe.setup()
    cfg = recipe.cfg
    assert recipe.kd_steps(0) == 0 and recipe.kd_steps(1) == 2  # Fast's warm-up epoch
    assert [recipe.synthesis_steps(e) for e in range(3)] == [1, 1, 1]
    banks = []
    for epoch in range(cfg.distill.epochs):
        syn = recipe.synthesis(epoch)
        kd = recipe.kd(epoch)
        assert ("bn" in syn) and (bool(kd) == (epoch >= 1))
        banks.append(len(comp.synthesizer.bank))
        assert recipe.evaluate(epoch) is None  # evaluation is off in the tiny config
        recipe.checkpoint(epoch)
        assert run_dir.checkpoint_epoch(recipe.directory) == epoch + 1
    result = recipe.finalize()
    assert banks == [8, 16, 24]
    # The same config run phase by phase or as one loop: the same student, bit for bit.
    a = load_file(str(whole.run_dir / run_dir.STUDENT))
    b = load_file(str(result.run_dir / run_dir.STUDENT))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_create_refuses_a_used_directory_and_clears_stale_files(
    tmp_path: Path, teacher_file: Path
) -> None:
    cfg = load_config(_config(tmp_path, teacher_file, "r"))
    run = run_dir.create(cfg)
    (run / run_dir.SUMMARY).write_text("{}")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(StarsError, match="already exists"):
        run_dir.create(cfg)
    again = run_dir.create(cfg, overwrite=True)
    assert again == run and not (run / run_dir.SUMMARY).exists()
    assert (run / "notes.txt").read_text() == "mine"  # not ours: left alone
    assert load_config(run / run_dir.CONFIG) == cfg


def test_trim_metrics_drops_later_epochs_and_cut_lines(tmp_path: Path) -> None:
    rows = [{"event": "calibration", "epoch": 0}] + [
        {"event": "epoch", "epoch": e} for e in (1, 2, 3)
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"event": "epo'
    (tmp_path / run_dir.METRICS).write_text(text)
    run_dir.trim_metrics(tmp_path, 2)
    kept = [json.loads(x) for x in (tmp_path / run_dir.METRICS).read_text().splitlines()]
    assert kept == rows[:3]


def test_resume_needs_a_checkpoint_and_a_failed_write_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StarsError, match="nothing to resume"):
        run_dir.resumed_config(tmp_path)
    assert run_dir.checkpoint_epoch(tmp_path) == 0
    not_a_dir = tmp_path / "file"  # a run directory that is a file: every write fails
    not_a_dir.write_text("")
    with pytest.raises(StarsError, match=r"previous checkpoint \(epoch 2\) is intact"):
        run_dir.save_checkpoint(not_a_dir, {"epoch": 3, "x": torch.zeros(1)})
