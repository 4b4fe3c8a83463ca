"""``benchmarks/term_trends.py``: window means of each loss term, per run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import term_trends


def _run(root: Path, name: str, tar: list[float]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    lines = [json.dumps({"event": "calibration", "synthesis/tar": 99.0})]
    for epoch, value in enumerate(tar, start=1):
        lines.append(json.dumps({"event": "epoch", "epoch": epoch, "synthesis/tar": value}))
        lines.append(json.dumps({"event": "eval", "epoch": epoch, "synthesis/tar": -99.0}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_windows_average_only_their_epochs(tmp_path: Path) -> None:
    run = _run(tmp_path, "stars-seed0", [1.0, 2.0, 3.0, 4.0, 5.0])
    t = term_trends.run_trends(run, ("synthesis/tar", "synthesis/bn"), ("2-3", "last2"))
    assert t["2-3"] == {"synthesis/tar": 2.5}  # bn is absent: left out, not 0
    assert t["last2"] == {"synthesis/tar": 4.5}  # calibration / eval records ignored


def test_cli_writes_one_row_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path / "g", "baseline-seed0", [0.4, 0.2])
    _run(tmp_path / "g", "stars-seed0", [0.3, 0.1])
    (tmp_path / "g" / "empty").mkdir()  # no metrics: not a row
    out = tmp_path / "t.md"
    argv = ["term_trends.py", str(tmp_path / "g"), "--keys", "synthesis/tar"]
    monkeypatch.setattr(sys, "argv", [*argv, "--windows", "1-1,last1", "--out", str(out)])
    term_trends.main()
    rows = [r for r in out.read_text().splitlines() if r.startswith("| ") and "seed" in r]
    assert rows == ["| baseline-seed0 | 2 | 0.400 | 0.200 |", "| stars-seed0 | 2 | 0.300 | 0.100 |"]
    assert out.read_text() == capsys.readouterr().out


def test_cli_refuses_a_bad_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["term_trends.py", str(tmp_path), "--windows", "x-y"])
    with pytest.raises(SystemExit) as e:
        term_trends.main()
    assert e.value.code == 2
