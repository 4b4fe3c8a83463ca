"""``benchmarks/paper_table.py``: runs each (variant, seed) once, resumes, tabulates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import paper_table
from stars.recipes.ablate import VARIANTS

TINY = [
    "distill.epochs=1",
    "distill.kd_steps_per_epoch=1",
    "distill.batch_size=8",
    "synthesis.batch_size=8",
    "synthesis.g_steps=1",
    "synthesis.warmup_epochs=0",
    "evaluation.batch_size=40",
    "evaluation.val_size=20",
    "evaluation.every_epochs=1",
]


def _main(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["paper_table.py", *args])
    paper_table.main()


def test_runs_resumes_and_tabulates(
    cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "results"
    sets = [*TINY, f"data.root={cifar_root}", f"output_dir={tmp_path / 'runs'}"]
    args = ["--family", "fast", "--split", "val", "--seeds", "1", "--out", str(out)]
    args += ["--variants", "baseline,stars"]
    for s in sets:
        args += ["--set", s]
    _main(monkeypatch, args)
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"], r["split"]) for r in runs] == [
        ("baseline", 0, "val"),
        ("stars", 0, "val"),
    ]
    assert all(0.0 <= r["student_top1"] <= 100.0 for r in runs)
    assert len({r["config_sha"] for r in runs}) == 1
    assert "synthesis/bn" in runs[0]["diagnostics"]
    assert "grad_norm/bn" in runs[0]["diagnostics"]["calibration"]
    assert runs[1]["diagnostics"]["term_gradients"]["grad_norm/tar"] > 0
    assert runs[0]["diagnostics"]["eval_curve"][-1] == [1, runs[0]["student_top1"]]

    _main(monkeypatch, args)  # everything done: nothing runs again
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2

    table = json.loads((out / "table.json").read_text())
    assert [(t["family"], t["split"]) for t in table] == [("fast", "val")]
    rows = {row["variant"]: row for row in table[0]["variants"]}
    assert set(rows) == {"baseline", "stars"}
    assert rows["stars"]["top1"] == [runs[1]["student_top1"]]
    md = (out / "table.md").read_text()
    assert "| baseline | 1 |" in md and "+0.00" in md


def test_family_config_hash_tracks_overrides() -> None:
    a = paper_table.family_config("fast", "val", [])
    b = paper_table.family_config("fast", "val", ["distill.epochs=2"])
    c = paper_table.family_config("fast", "test", [])
    assert a[0].evaluation.split == "val" and c[0].evaluation.split == "test"
    assert len({a[1], b[1], c[1]}) == 3
    assert paper_table.family_config("fast", "val", [])[1] == a[1]
    assert paper_table.family_config("deepinversion", "val", [])[0].synthesis.kind == (
        "deepinversion"
    )


def test_table_says_which_config_each_group_ran() -> None:
    """A group of the YAML as committed says so; a group of an earlier YAML (or with
    overrides) names the commit it ran at and its overrides."""
    cfg, now = paper_table.family_config("fast", "test", [])
    same = f"distill.epochs={cfg.distill.epochs}"  # the committed value
    assert paper_table.family_config("fast", "test", [same])[1] == now
    old = paper_table.family_config("fast", "test", ["distill.epochs=3"])[1]
    current = [{"commit": "aaa1111", "overrides": []}]
    assert paper_table._provenance("fast", "test", now, current) == "`fast.yaml` as it is now"
    run_as = [{"commit": "aaa1111", "overrides": [same]}]
    assert f"(run as {same})" in paper_table._provenance("fast", "test", now, run_as)
    earlier = [{"commit": "bbb2222", "overrides": ["distill.epochs=3"]}]
    assert paper_table._provenance("fast", "test", old, earlier) == (
        "`fast.yaml` at commit bbb2222 + distill.epochs=3"
    )


class _Stop(Exception):
    """Stands in for the end of a session in the middle of a run."""


def test_an_interrupted_run_continues_from_its_checkpoint(
    cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stars.run_dir

    out = tmp_path / "results"
    sets = [*TINY, "distill.epochs=2", f"data.root={cifar_root}", f"output_dir={tmp_path}"]
    args = ["--family", "fast", "--split", "val", "--seeds", "1", "--out", str(out)]
    args += ["--variants", "baseline"]
    for s in sets:
        args += ["--set", s]
    from stars.distill.checkpoint import save_state as save

    def save_then_stop(path: Path, state: dict[str, object]) -> None:
        save(path, state)
        raise _Stop

    monkeypatch.setattr(stars.run_dir, "save_state", save_then_stop)
    with pytest.raises(_Stop):
        _main(monkeypatch, args)
    assert not (out / "runs.jsonl").exists()
    (run,) = (tmp_path / "val").glob("fast-*/baseline-seed0")
    with (run / "metrics.jsonl").open("a") as fh:  # a start from scratch would delete it
        fh.write(json.dumps({"event": "marker"}) + "\n")

    monkeypatch.setattr(stars.run_dir, "save_state", save)
    _main(monkeypatch, args)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "marker"} in lines
    assert [r["epoch"] for r in lines if r["event"] == "epoch"] == [1, 2]
    (record,) = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert record["seconds"] == json.loads((run / "summary.json").read_text())["seconds"]


@pytest.mark.parametrize("family", sorted(paper_table.FAMILIES))
def test_every_family_file_is_a_valid_config_with_its_variants(family: str) -> None:
    cfg, sha = paper_table.family_config(family, "val", [])
    assert cfg.evaluation.split == "val" and len(sha) == 12
    assert paper_table.FAMILIES[family][0] == "baseline"
    assert set(paper_table.FAMILIES[family]) <= set(VARIANTS)


def test_diagnostics_time_the_epochs_and_keep_the_firing_by_layer(tmp_path: Path) -> None:
    records = [
        {"event": "calibration", "grad_norm/bn": 2.0},
        *(
            {"event": "epoch", "epoch": e, "seconds": t, "kd/kd": float(e)}
            for e, t in ((1, 10.0), (2, 30.0), (3, 50.0), (4, 125.0))
        ),  # epoch 4 carries an evaluation
        {
            "event": "eval",
            "epoch": 4,
            "student_top1": 40.0,
            "mean_firing_rate": 0.1,
            "firing_rates": {"encoder_neuron": 0.2, "features.1": 0.05},
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = paper_table.diagnostics(tmp_path, last=2)
    assert out["median_epoch_s"] == 20.0  # steps 20, 20, 75
    assert out["kd/kd"] == 3.5
    assert out["firing_rates"] == {"encoder_neuron": 0.2, "features.1": 0.05}
    assert out["eval_curve"] == [(4, 40.0)]
