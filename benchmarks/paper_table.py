"""Does STARS beat its baseline? The paper's CIFAR-10 comparison at CPU scale.

    python benchmarks/paper_table.py --family fast --split val [--seeds 3] [--variants ...]
    python benchmarks/paper_table.py --table-only

Each (family, variant, seed) is one ``stars distill`` run of ``benchmarks/paper_table/
<family>.yaml`` with the variant's STARS terms toggled (``stars.recipes.ablate.VARIANTS``): the same
budget (synthesis and KD steps) for every variant. Every ``benchmarks/paper_table/*.yaml`` is
a family (``--family``; its variants are listed in :data:`FAMILIES`).

Resumable: every finished run appends one JSON line to
``benchmarks/results/paper_table/runs.jsonl`` (split, family, variant, seed, the config's
hash, student and teacher top-1, wall time, loss-term diagnostics), and runs already there
for the same config are skipped, so the table can be filled over several sessions or by
several processes at once (e.g. one per variant, ``--threads 1`` each). A run that was
interrupted (its checkpoint is in its run directory, under the same config) continues from
its last epoch instead of starting over. ``--set`` applies
overrides to the family config (and changes its hash: the table groups by it).

Tune against ``--split val`` (5,000 training images held out, fixed); report ``--split
test`` once per final setting. The tables (markdown + JSON) are rewritten after each run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from stars.config import RunConfig, apply_overrides, load_config
from stars.errors import StarsError
from stars.recipes.ablate import variant_config
from stars.recipes.distill import run_distill
from stars.run_dir import CHECKPOINT
from stars.runtime import tune_malloc

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "paper_table"
VARIANTS_OF: dict[str, tuple[str, ...]] = {
    "fast": ("baseline", "rca", "tar", "spike", "stars"),
    "deepinversion": ("baseline", "stars"),
}
"""A family's variants where it has more than baseline vs + STARS."""
FAMILIES: dict[str, tuple[str, ...]] = {
    path.stem: VARIANTS_OF.get(path.stem, ("baseline", "spike", "stars"))
    for path in sorted(CONFIGS.glob("*.yaml"))
}
"""Every family file in benchmarks/paper_table/ (a new one needs no edit here)."""
DIAGNOSTIC_KEYS = (
    "synthesis/bn",
    "synthesis/oh",
    "synthesis/adv",
    "synthesis/rca",
    "synthesis/rca_weight",
    "synthesis/tar",
    "synthesis/tar_saturated",
    "synthesis/spike_tar",
    "kd/kd",
    "kd/rca",
    "kd/spike_tar",
    "kd/agreement",
)


def family_config(family: str, split: str, overrides: list[str]) -> tuple[RunConfig, str]:
    """The family's config with the split and overrides applied, and its short hash."""
    tree = yaml.safe_load((CONFIGS / f"{family}.yaml").read_text())
    tree = apply_overrides(tree, [*overrides, f"evaluation.split={split}"])
    cfg = RunConfig.model_validate(tree)
    # Only the fields set away from their defaults: a field added to the schema later (at its
    # default) leaves the hash, and so the grouping of earlier runs, unchanged.
    blob = json.dumps(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=True).encode()
    return cfg, hashlib.sha256(blob).hexdigest()[:12]


def diagnostics(run_dir: Path, last: int = 10) -> dict[str, Any]:
    """Mean of each loss term over the last ``last`` epochs, the calibration record and the
    end-of-run ``term_gradients`` (gradient norm of each synthesis term on the images, at the
    start and on memory-bank images at the end), the median epoch time, and the last
    evaluation's firing rates (mean and per layer) and the evaluation curve."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("event") == "epoch"][-last:]
    out: dict[str, Any] = {}
    for key in DIAGNOSTIC_KEYS:
        values = [float(r[key]) for r in epochs if key in r]
        if values:
            out[key] = statistics.fmean(values)
    for event in ("calibration", "term_gradients"):
        found = next((r for r in records if r.get("event") == event), None)
        if found is not None:
            out[event] = {k: v for k, v in found.items() if "/" in k}
    # ``seconds`` is the run's clock at each epoch's end: the median step between two
    # epochs is the per-epoch time without compilation, evaluation or a resume's gap
    clock = [float(r["seconds"]) for r in records if r.get("event") == "epoch" and "seconds" in r]
    steps = [b - a for a, b in itertools.pairwise(clock)]
    if steps:
        out["median_epoch_s"] = statistics.median(steps)
    evals = [r for r in records if r.get("event") == "eval"]
    if evals:
        out["mean_firing_rate"] = evals[-1].get("mean_firing_rate")
        out["firing_rates"] = evals[-1].get("firing_rates")
        out["eval_curve"] = [(r["epoch"], r["student_top1"]) for r in evals]
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _resumable(cfg: RunConfig) -> Path | None:
    """The run directory of an interrupted run of exactly ``cfg`` (its checkpoint is there
    and its saved config is the same), to continue instead of starting over."""
    run = Path(cfg.output_dir) / (cfg.name or "")
    if not cfg.name or not (run / CHECKPOINT).is_file():
        return None
    try:
        saved = load_config(run / "config.yaml")
    except (OSError, StarsError):
        return None
    return run if saved.model_dump(mode="json") == cfg.model_dump(mode="json") else None


def _provenance(family: str, split: str, sha: str, rs: list[dict[str, Any]]) -> str:
    """Which config a group ran: the family YAML as committed now, or the one of the group's
    first run's commit with that run's overrides (the YAML may have changed since)."""
    overrides = rs[0].get("overrides") or []
    now = f"`{family}.yaml` as it is now"
    try:
        if family_config(family, split, [])[1] == sha:
            return now if not overrides else f"{now} (run as {' '.join(overrides)})"
    except (OSError, ValueError):
        pass
    base = f"`{family}.yaml` at commit {rs[0].get('commit', '?')}"
    return base + (f" + {' '.join(overrides)}" if overrides else "")


def write_tables(runs: list[dict[str, Any]], out: Path) -> str:
    """Markdown + JSON: per (split, family, config hash), mean / std of each variant."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["split"], r["family"], r["config_sha"]), []).append(r)
    lines = ["# paper_table results", ""]
    data: list[dict[str, Any]] = []
    for (split, family, sha), rs in sorted(groups.items()):
        teacher = next((r["teacher_top1"] for r in rs if r.get("teacher_top1") is not None), None)
        overrides = rs[0].get("overrides") or []
        provenance = _provenance(family, split, sha, rs)
        lines += [
            f"## {family}, {split} split (config {sha}: {provenance})",
            "",
            f"Teacher top-1 on the same images: {teacher}",
            "",
            "| variant | seeds | top-1 mean | std | vs baseline | per seed | wall (min) |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]
        rows: list[dict[str, Any]] = []
        for variant in FAMILIES[family]:
            mine = sorted((r for r in rs if r["variant"] == variant), key=lambda r: r["seed"])
            if not mine:
                continue
            accs = [float(r["student_top1"]) for r in mine]
            rows.append(
                {
                    "variant": variant,
                    "seeds": [r["seed"] for r in mine],
                    "top1": accs,
                    "mean": statistics.fmean(accs),
                    "std": _std(accs),
                    "mean_minutes": statistics.fmean(r["seconds"] for r in mine) / 60,
                }
            )
        base = next((row["mean"] for row in rows if row["variant"] == "baseline"), None)
        for row in rows:
            delta = "" if base is None else f"{row['mean'] - base:+.2f}"
            lines.append(
                f"| {row['variant']} | {len(row['top1'])} | {row['mean']:.2f} | "
                f"{row['std']:.2f} | {delta} | "
                + ", ".join(f"{a:.2f}" for a in row["top1"])
                + f" | {row['mean_minutes']:.1f} |"
            )
        lines.append("")
        data.append(
            {
                "split": split,
                "family": family,
                "config_sha": sha,
                "overrides": overrides,
                "provenance": provenance,
                "teacher_top1": teacher,
                "variants": rows,
            }
        )
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(data, indent=2) + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", choices=sorted(FAMILIES), action="append")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--seed-list", type=str, default=None, help="e.g. 1,2 (overrides --seeds)")
    p.add_argument("--variants", type=str, default=None, help="comma list; default: all")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/paper_table")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    tune_malloc()  # as the stars CLI does
    console = Console()
    log = args.out / "runs.jsonl"
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table_only:
        seeds = (
            [int(s) for s in args.seed_list.split(",")]
            if args.seed_list
            else list(range(args.seeds))
        )
        for family in args.family or ["fast"]:
            cfg, sha = family_config(family, args.split, args.overrides)
            wanted = args.variants.split(",") if args.variants else list(FAMILIES[family])
            for variant in wanted:
                if variant not in FAMILIES[family]:
                    p.error(f"--variants: {variant!r} is not one of {FAMILIES[family]}")
                for seed in seeds:
                    key = (args.split, family, sha, variant, seed)
                    done = {
                        (r["split"], r["family"], r["config_sha"], r["variant"], r["seed"])
                        for r in load_runs(log)
                    }
                    if key in done:
                        console.print(f"skip {key}: already in {log}")
                        continue
                    run_dir_root = Path(cfg.output_dir) / args.split / f"{family}-{sha}"
                    vcfg = variant_config(cfg, variant, seed, run_dir_root)
                    console.rule(f"{family} / {variant} / seed {seed} / {args.split}")
                    start = time.time()
                    resume = _resumable(vcfg)
                    if resume is not None:
                        console.print(f"resuming the interrupted run in {resume}")
                    result = run_distill(vcfg, resume=resume, overwrite=True, console=console)
                    record = {
                        "split": args.split,
                        "family": family,
                        "config_sha": sha,
                        "overrides": args.overrides,
                        "variant": variant,
                        "seed": seed,
                        "student_top1": result.summary.get("student_top1"),
                        "teacher_top1": result.summary.get("teacher_top1"),
                        # the run's own clock counts the time before an interruption too
                        "seconds": float(result.summary.get("seconds", time.time() - start)),
                        "threads": torch.get_num_threads(),
                        "commit": _git_commit(),
                        "run_dir": str(result.run_dir),
                        "diagnostics": diagnostics(result.run_dir),
                    }
                    log.parent.mkdir(parents=True, exist_ok=True)
                    with log.open("a") as fh:  # one line per run: appends are atomic
                        fh.write(json.dumps(record) + "\n")
                    write_tables(load_runs(log), args.out)
    console.print(write_tables(load_runs(log), args.out))


if __name__ == "__main__":
    main()
