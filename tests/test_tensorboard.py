"""TensorBoard events: the same scalars as ``metrics.jsonl`` and the synthetic grid, read back
from the event files with TensorBoard's own reader.

TensorBoard stores a scalar as a float32 (``simple_value``), so a value read back is the
float32 nearest to the JSON number (round to nearest): compared with ``np.float32(value)``
exactly, not within a tolerance.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import records, tiny_run_config

from stars.config import load_config
from stars.recipes.distill import run_distill
from stars.runtime import MetricsLog
from stars.tensorboard_log import TB_DIR, scalars


def _events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = _events(logdir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in scalars(row):
            out.setdefault(tag, []).append((int(row["epoch"]), float(np.float32(value))))
    return out


def _same(a: dict[str, list[tuple[int, float]]], b: dict[str, list[tuple[int, float]]]) -> None:
    assert a.keys() == b.keys()
    for tag in a:
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        for (_, x), (_, y) in zip(a[tag], b[tag], strict=True):
            assert x == y or (math.isnan(x) and math.isnan(y)), (tag, x, y)


def test_scalars_names_every_number_and_nothing_else() -> None:
    record = {
        "event": "eval",
        "epoch": 3,
        "top1": 61.5,
        "n": 7,
        "ok": True,
        "note": "x",
        "none": None,
        "rates": {"sn1": 0.25, "deep": {"a": 1}},
        "masses": [0.1, 0.2],
    }
    assert dict(scalars(record)) == {
        "eval/top1": 61.5,
        "eval/n": 7.0,
        "eval/rates/sn1": 0.25,
        "eval/rates/deep/a": 1.0,
        "eval/masses/0": 0.1,
        "eval/masses/1": 0.2,
    }


_number = st.one_of(
    st.integers(-(2**31), 2**31),
    st.floats(min_value=-1e30, max_value=1e30),
    st.just(float("nan")),
)
_value = st.recursive(
    st.one_of(_number, st.booleans(), st.none(), st.text(max_size=3)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text("abc", min_size=1, max_size=2), inner, max_size=3),
    ),
    max_leaves=8,
)
_record = st.dictionaries(st.text("xyz/_", min_size=1, max_size=4), _value, max_size=5)


@examples(25)
@given(rows=st.lists(_record, min_size=1, max_size=4), event=st.sampled_from(["epoch", "eval"]))
def test_events_hold_what_metrics_jsonl_holds(
    tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, Any]], event: str
) -> None:
    """Property: whatever numbers a record holds, the event file holds the same at its epoch."""
    run = tmp_path_factory.mktemp("run")
    with MetricsLog(run / "metrics.jsonl", tensorboard=True) as log:
        for epoch, row in enumerate(rows, 1):
            log.write({"event": event, "epoch": epoch} | row)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    _same(_read_scalars(run / TB_DIR), _expected(lines))


def test_a_resumed_log_replaces_the_interrupted_epochs(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, tensorboard=True) as log:
        for epoch in (1, 2, 3):
            log.write({"event": "epoch", "epoch": epoch, "loss": float(epoch)})
    with MetricsLog(path, tensorboard=True, resume_after=1) as log:
        for epoch in (2, 3):
            log.write({"event": "epoch", "epoch": epoch, "loss": 10.0 * epoch})
    assert _read_scalars(tmp_path / TB_DIR) == {"epoch/loss": [(1, 1.0), (2, 20.0), (3, 30.0)]}


def test_a_fresh_log_starts_fresh_events(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, tensorboard=True) as log:
        log.write({"event": "epoch", "epoch": 1, "old": 1.0})
    path.unlink()  # what --overwrite does to the replaced run's log
    with MetricsLog(path, tensorboard=True) as log:
        log.write({"event": "epoch", "epoch": 1, "new": 2.0})
    assert _read_scalars(tmp_path / TB_DIR) == {"epoch/new": [(1, 2.0)]}


def test_off_by_default_and_on_rank_zero_only(tmp_path: Path) -> None:
    with MetricsLog(tmp_path / "metrics.jsonl") as log:
        log.write({"event": "epoch", "epoch": 1, "x": 1.0})
    with MetricsLog(None, tensorboard=True) as log:
        log.write({"event": "epoch", "epoch": 1, "x": 1.0})
    assert not (tmp_path / TB_DIR).exists()


def test_distill_writes_the_metrics_and_the_grid(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load_config(tiny_run_config(tmp_path, teacher_file, tensorboard=True))
    run = run_distill(cfg, show_progress=False).run_dir
    rows = records(run)
    assert {r["event"] for r in rows} >= {"calibration", "epoch", "term_gradients"}
    got = _read_scalars(run / TB_DIR)
    _same(got, _expected(rows))
    assert len(got) > 10 and "epoch/kd/loss" in got
    images = _events(run / TB_DIR).Images("synthetic_grid")
    assert [e.step for e in images] == [cfg.distill.epochs]
    with (
        Image.open(io.BytesIO(images[0].encoded_image_string)) as tb,
        Image.open(run / "synthetic_grid.png") as png,
    ):
        assert np.array_equal(np.asarray(tb.convert("RGB")), np.asarray(png.convert("RGB")))
