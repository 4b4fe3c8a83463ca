#!/usr/bin/env python3
"""Summarize a ``scripts/gpu_check.sh`` run: images/s and peak GPU memory per stage.

    python3 scripts/gpu_report.py --stages STAGES.tsv [--teacher-run DIR] [--distill-run DIR]
        [--bench BENCH.json] [--train-images N]

Throughput from the runs' ``metrics.jsonl`` (its ``seconds`` are cumulative from the start
of the run; the first epoch also holds start-up, the gradient calibration and any
``torch.compile``, so steady rates leave it out):

- teacher: ``(E - 1) * images_per_epoch / (seconds[E] - seconds[1])``, data loading included;
- synthesis (warm-up epochs: BN + CE + TAR, no student): synthesized images per second;
- synthesis + KD (epochs after warm-up): KD images per second of such an epoch, and an
  estimate of KD alone (the warm-up synthesis time subtracted; the adversarial synthesis of
  these epochs costs more, so KD alone is underestimated). ``gpu_bench.py`` times each alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def _records(run: Path, event: str) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("event") == event:
                out.append(rec)
    return out


def _config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _summary(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(x: float | None, unit: str = "", nd: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{nd}f}{unit}"


def teacher_lines(run: Path, train_images: int | None) -> list[str]:
    recs = _records(run, "train")
    cfg = _config(run)
    lines = [f"teacher training ({run}):"]
    if not recs:
        return [*lines, "  no metrics (stage failed or skipped)"]
    batch = int(cfg.get("train", {}).get("batch_size", 128))
    limit = cfg.get("train", {}).get("max_train_images")
    n = train_images
    if limit is not None:
        n = int(limit) if n is None else min(int(limit), n)
    per_epoch = None
    if n is not None:
        # the loader drops a last partial batch
        per_epoch = (n // batch) * batch if n > batch else n
    secs = [float(r["seconds"]) for r in recs]
    lines.append(
        f"  epochs {len(recs)}, images/epoch {_fmt(per_epoch)}, "
        f"epoch seconds {', '.join(f'{s:.1f}' for s in _deltas(secs))}"
    )
    if per_epoch and len(secs) >= 2:
        rate = (len(secs) - 1) * per_epoch / (secs[-1] - secs[0])
        lines.append(
            f"  steady images/s (epochs 2..{len(secs)}, data loading included): {rate:,.0f}"
        )
        lines.append(
            "  projection, 200 epochs x 50,000 images at this rate: "
            f"{200 * 50000 / rate / 60:.0f} min"
        )
    elif per_epoch:
        lines.append(f"  images/s (one epoch, start-up included): {per_epoch / secs[0]:,.0f}")
    top1 = _summary(run).get("test_top1", recs[-1].get("test_top1"))
    lines.append(f"  test top-1: {_fmt(top1, '%', 2)}")
    return lines


def _deltas(secs: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *secs[:-1]], secs, strict=True)]


def distill_lines(run: Path) -> list[str]:
    recs = _records(run, "epoch")
    cfg = _config(run)
    lines = [f"distillation ({run}):"]
    if not recs:
        return [*lines, "  no metrics (stage failed or skipped)"]
    syn = cfg.get("synthesis", {})
    dis = cfg.get("distill", {})
    warm = int(syn.get("warmup_epochs", 0))
    sb, gs = int(syn.get("batch_size", 256)), int(syn.get("g_steps", 1))
    sp = int(dis.get("synthesis_steps_per_epoch", 1))
    kb, ks = int(dis.get("batch_size", 256)), int(dis.get("kd_steps_per_epoch", 0))
    secs = [float(r["seconds"]) for r in recs]
    d = _deltas(secs)
    lines.append(
        f"  epochs {len(recs)} (warm-up {warm}); per epoch {sp} synthesis batch(es) of {sb} x "
        f"{gs} generator steps, then {ks} KD steps of {kb}"
    )
    lines.append(
        f"  epoch seconds: {', '.join(f'{x:.1f}' for x in d)} (epoch 1: start-up, "
        "calibration, compile)"
    )
    t_syn = None
    if warm >= 2:
        t_syn = (secs[warm - 1] - secs[0]) / (warm - 1)
        lines.append(
            f"  synthesis (warm-up, no student): {sp * sb / t_syn:,.1f} images/s, "
            f"{sp * gs / t_syn:,.1f} generator steps/s"
        )
    kd_epochs = len(recs) - warm
    if kd_epochs >= 2 and ks:
        first = warm + 1  # the first KD epoch also compiles the student's training graph
        t_ep = (secs[-1] - secs[first - 1]) / (len(recs) - first)
        lines.append(
            f"  synthesis + KD epoch (after the first KD epoch): {t_ep:.2f} s, "
            f"{ks * kb / t_ep:,.0f} KD images/s of epoch"
        )
        if t_syn is not None and t_ep > t_syn:
            lines.append(
                f"  KD alone (estimate, warm-up synthesis time subtracted): "
                f"{ks * kb / (t_ep - t_syn):,.0f} images/s "
                f"({kb} images x T student passes each)"
            )
    s = _summary(run)
    lines.append(
        f"  student top-1 {_fmt(s.get('student_top1'), '%', 2)}, teacher top-1 "
        f"{_fmt(s.get('teacher_top1'), '%', 2)}, skipped KD steps {s.get('skipped_kd_steps')}, "
        f"skipped synthesis steps {s.get('skipped_synthesis_steps')}"
    )
    return lines


def bench_lines(path: Path) -> list[str]:
    lines = [f"isolated GPU timings ({path}):"]
    if not path.is_file():
        return [*lines, "  none (stage failed or skipped)"]
    b = json.loads(path.read_text())
    lines.append(
        f"  {b.get('gpu')}, torch {b.get('torch')} (CUDA {b.get('cuda')}), precision "
        f"{b.get('precision')}, channels_last {b.get('channels_last')}, compile {b.get('compile')}"
    )
    if t := b.get("teacher_train"):
        lines.append(
            f"  teacher train step ({t['arch']}, batch {t['batch']}, random data, "
            f"{'compiled' if t['compiled'] else 'eager'}): {t['images_per_s']:,.0f} images/s, "
            f"peak {_fmt(t['peak_gib'], ' GiB', 2)}"
        )
    if s := b.get("synthesis"):
        lines.append(
            f"  synthesis (adversarial + STARS on): {s['images_per_s']:,.1f} images/s "
            f"({s['seconds_per_batch']:.3f} s per batch of {s['batch']} x {s['g_steps']} steps, "
            f"{s['image_passes_per_s']:,.0f} image passes/s), "
            f"peak {_fmt(s['peak_gib'], ' GiB', 2)}, "
            f"first calls {s['warmup_seconds']:.1f} s"
        )
    if k := b.get("kd"):
        lines.append(
            f"  KD: {k['images_per_s']:,.0f} images/s ({k['seconds_per_step'] * 1000:.1f} ms per "
            f"step of {k['batch']}, T={k['T']}), peak {_fmt(k['peak_gib'], ' GiB', 2)}, "
            f"first calls {k['warmup_seconds']:.1f} s"
        )
    if p := b.get("projection"):
        lines.append(
            f"  projection, full config ({b.get('config')}): {p['total_hours']:.2f} h "
            f"(synthesis {p['synthesis_hours']:.2f} h + KD {p['kd_hours']:.2f} h; "
            "GPU steps only, no evaluation)"
        )
    if b.get("warnings"):
        lines.append("  warnings: " + " | ".join(b["warnings"][:5]))
    return lines


def stage_lines(path: Path) -> list[str]:
    lines = ["stages (rc, wall seconds, peak GPU memory used by nvidia-smi):"]
    if not path.is_file():
        return [*lines, "  none"]
    for row in path.read_text().splitlines():
        parts = row.split("\t")
        if len(parts) >= 4:
            name, rc, secs, peak = parts[:4]
            peak_txt = "n/a" if peak in ("", "-") else f"{int(peak):,} MiB"
            lines.append(f"  {name:<10} rc={rc:<4} {float(secs):7.1f} s   peak {peak_txt}")
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--stages", type=Path, required=True)
    p.add_argument("--teacher-run", type=Path)
    p.add_argument("--distill-run", type=Path)
    p.add_argument("--bench", type=Path)
    p.add_argument("--train-images", type=int)
    a = p.parse_args(argv)
    lines = stage_lines(a.stages)
    if a.teacher_run is not None:
        lines += ["", *teacher_lines(a.teacher_run, a.train_images)]
    if a.distill_run is not None:
        lines += ["", *distill_lines(a.distill_run)]
    if a.bench is not None:
        lines += ["", *bench_lines(a.bench)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
