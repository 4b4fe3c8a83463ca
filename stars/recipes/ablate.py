"""``stars ablate``: baseline vs +RCA vs +TAR vs STARS over seeds, as a table.

Each variant is the same config with STARS terms toggled: ``baseline`` turns RCA (generator
and student weights) and TAR off, ``rca`` keeps only RCA, ``tar`` only TAR, ``stars`` both,
as configured. Every run gets its own directory; the table (mean and standard deviation of
the student's top-1 per variant, wall time) is printed and written as markdown and JSON.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stars.config import RunConfig, apply_overrides
from stars.errors import StarsError
from stars.recipes.distill import run_distill

__all__ = ["VARIANTS", "run_ablation", "variant_config"]

_OFF_RCA = ["stars.rca.weight=0", "stars.rca.student_weight=0"]
_OFF_TAR = ["stars.tar.weight=0"]
_OFF_SPIKE = ["stars.spike_tar.weight=0", "stars.spike_tar.student_weight=0"]
VARIANTS: dict[str, list[str]] = {
    "baseline": _OFF_RCA + _OFF_TAR + _OFF_SPIKE,
    "rca": _OFF_TAR + _OFF_SPIKE,
    "tar": _OFF_RCA + _OFF_SPIKE,
    "spike": _OFF_RCA + _OFF_TAR,
    "stars": [],
}


def variant_config(cfg: RunConfig, variant: str, seed: int, output_dir: Path) -> RunConfig:
    """``cfg`` with the variant's STARS terms toggled, the seed and a run name set."""
    if variant not in VARIANTS:
        raise StarsError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    overrides = [*VARIANTS[variant], f"seed={seed}", f"name={variant}-seed{seed}"]
    tree = apply_overrides(cfg.model_dump(mode="json"), overrides)
    tree["output_dir"] = str(output_dir)
    return RunConfig.model_validate(tree)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def run_ablation(
    cfg: RunConfig,
    *,
    variants: list[str],
    seeds: int,
    out: Path | None,
    console: Console,
) -> dict[str, Any]:
    """Run every (variant, seed); return and write the table."""
    for v in variants:
        if v not in VARIANTS:
            raise StarsError(f"unknown variant {v!r}; allowed: {', '.join(VARIANTS)}")
    if not cfg.evaluation.enabled:
        raise StarsError("ablate compares test accuracy: set evaluation.enabled=true")
    s = cfg.stars
    if "rca" in variants and s.rca.weight == 0 and s.rca.student_weight == 0:
        console.print(
            "[yellow]The config's RCA weights are 0: the 'rca' variant is the baseline.[/]"
        )
    if "tar" in variants and s.tar.weight == 0:
        console.print("[yellow]The config's TAR weight is 0: the 'tar' variant is the baseline.[/]")
    folder = out or cfg.output_dir / f"ablate-{cfg.name or 'run'}"
    folder.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for variant in variants:
        for seed in range(seeds):
            vcfg = variant_config(cfg, variant, seed, folder / "runs")
            console.rule(f"{variant}, seed {seed}")
            result = run_distill(vcfg, overwrite=True, console=console, show_progress=False)
            acc = result.summary.get("student_top1")
            if acc is None:
                raise StarsError("no test accuracy was measured: ablate needs test data")
            runs.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "student_top1": acc,
                    "teacher_top1": result.summary.get("teacher_top1"),
                    "seconds": result.summary["seconds"],
                    "run_dir": str(result.run_dir),
                }
            )
    rows: list[dict[str, Any]] = []
    for variant in variants:
        accs = [r["student_top1"] for r in runs if r["variant"] == variant]
        secs = [r["seconds"] for r in runs if r["variant"] == variant]
        rows.append(
            {
                "variant": variant,
                "seeds": len(accs),
                "mean": statistics.fmean(accs),
                "std": _std(accs),
                "top1": accs,
                "mean_seconds": statistics.fmean(secs),
            }
        )
    teacher = next((r["teacher_top1"] for r in runs if r["teacher_top1"] is not None), None)
    table = Table(title=f"stars ablate ({cfg.synthesis.kind}, teacher top-1 {teacher})")
    for col in ("variant", "seeds", "top-1 mean", "std", "per seed", "wall (min)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    lines = [
        f"Teacher top-1: {teacher}  |  synthesis: {cfg.synthesis.kind}",
        "",
        "| variant | seeds | top-1 mean | std | per seed | wall (min) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{a:.2f}" for a in r["top1"])
        cells = (
            str(r["variant"]),
            str(r["seeds"]),
            f"{r['mean']:.2f}",
            f"{r['std']:.2f}",
            per_seed,
            f"{r['mean_seconds'] / 60:.1f}",
        )
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    table_data: dict[str, Any] = {"teacher_top1": teacher, "variants": rows, "runs": runs}
    (folder / "ablation.json").write_text(json.dumps(table_data, indent=2) + "\n")
    (folder / "ablation.md").write_text("\n".join(lines) + "\n")
    console.print(f"Table written to {folder / 'ablation.md'} and {folder / 'ablation.json'}")
    return table_data
