"""How the synthesis terms move over a paper_table run: each loss term's mean over windows
of epochs, per run, from the runs' own ``metrics.jsonl``.

    python benchmarks/term_trends.py runs/paper_table/test/fast-7acaf557eae2 \
        --out benchmarks/results/paper_table/term_trends_fast-7acaf557eae2.md

The per-epoch logs stay in the (uncommitted) run directories; ``runs.jsonl`` keeps only the
last-10-epoch means. This keeps the early-vs-late comparison benchmarks/README.md draws
(e.g. the TAR exceedance early and late, with and without TAR) reproducible and committed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

DEFAULT_KEYS = ("synthesis/bn", "synthesis/tar", "synthesis/oh", "kd/agreement")
DEFAULT_WINDOWS = ("11-20", "last10")


def _epoch_records(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(x) for x in lines if x) if r.get("event") == "epoch"]


def _window(epochs: list[dict[str, float]], spec: str) -> list[dict[str, float]]:
    """Epoch records inside ``spec``: ``A-B`` (inclusive epoch numbers) or ``lastN``;
    ValueError for anything else."""
    if spec.startswith("last") and spec[4:].isdigit():
        return epochs[-int(spec[4:]) :]
    lo, sep, hi = spec.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit()):
        raise ValueError(f"{spec!r} is neither A-B (epochs) nor lastN")
    return [r for r in epochs if int(lo) <= r["epoch"] <= int(hi)]


def _trends(
    epochs: list[dict[str, float]], keys: tuple[str, ...], windows: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for spec in windows:
        chosen = _window(epochs, spec)
        out[spec] = {
            k: statistics.fmean(float(r[k]) for r in chosen if k in r)
            for k in keys
            if any(k in r for r in chosen)
        }
    return out


def run_trends(
    run_dir: Path, keys: tuple[str, ...], windows: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """``{window: {key: mean}}`` for one run; a key absent from a window is left out."""
    return _trends(_epoch_records(run_dir), keys, windows)


def trends_table(group: Path, keys: tuple[str, ...], windows: tuple[str, ...]) -> str:
    """A markdown table: one row per run directory under ``group`` that has metrics."""
    runs = sorted(d for d in group.iterdir() if (d / "metrics.jsonl").is_file())
    if not runs:
        raise SystemExit(f"no run directories with metrics.jsonl under {group}")
    header = ["run", "epochs"] + [f"{k} ({w})" for w in windows for k in keys]
    lines = [
        f"# Loss terms over epochs: `{group}`",
        "",
        "Mean of each term over the given epochs (`lastN`: the last N epochs); `epochs` is how",
        "many epochs the run has logged (fewer than its budget: still running or cut off).",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for run in runs:
        epochs = _epoch_records(run)
        t = _trends(epochs, keys, windows)
        cells = [f"{t[w][k]:.3f}" if k in t[w] else "" for w in windows for k in keys]
        lines.append("| " + " | ".join([run.name, str(len(epochs)), *cells]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "group",
        type=Path,
        help="a paper_table config group, e.g. runs/paper_table/test/fast-<hash>",
    )
    p.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="comma list of metric keys")
    p.add_argument("--windows", default=",".join(DEFAULT_WINDOWS), help="comma list: A-B or lastN")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    a = p.parse_args()
    for spec in a.windows.split(","):
        try:
            _window([], spec)
        except ValueError as e:
            p.error(f"--windows: {e}")
    if not a.group.is_dir():
        p.error(f"group: {a.group} is not a directory")
    table = trends_table(a.group, tuple(a.keys.split(",")), tuple(a.windows.split(",")))
    print(table, end="")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table)


if __name__ == "__main__":
    main()
