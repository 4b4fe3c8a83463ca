#!/usr/bin/env python3
"""Time the three GPU workloads of stars in isolation and record peak GPU memory.

    python3 scripts/gpu_bench.py CONFIG [--set a.b=v ...] [--json OUT.json]

CONFIG is a distillation config (``stars distill``); its teacher checkpoint must exist.
Measured, each after warm-up calls (which also absorb ``torch.compile``):

- teacher training step: the config's teacher architecture, freshly initialized, on random
  images at the teacher-training batch (``--teacher-batch``, default 128), SGD, the config's
  precision and channels-last; eager as ``stars train-teacher`` runs it (``--teacher-compile``
  to compile it). No data loading: compare with the images/s of a real ``train-teacher`` run
  to see whether the loader is the bottleneck.
- synthesis: ``synthesizer.synthesize(student)`` after the warm-up epochs (adversarial and
  STARS terms on), i.e. one batch of ``synthesis.batch_size`` images, ``g_steps`` each.
- KD: ``distiller.step`` on ``distill.batch_size`` images sampled from the memory bank.

Each stage resets the peak-memory counter and reports ``torch.cuda.max_memory_allocated``.
The JSON also projects the full run's GPU time from the measured steps (evaluation, data
loading and checkpoints excluded): ``epochs * synthesis_steps_per_epoch`` synthesis calls
plus ``(epochs - warmup) * kd_steps_per_epoch`` KD steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def _timed(fn: Any, warmup: int, iters: int) -> tuple[float, float]:
    """(seconds of the warm-up calls, seconds per timed call)."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync()
    t1 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return t1 - t0, (time.perf_counter() - t1) / max(iters, 1)


def bench_teacher(cfg: Any, geo: Any, args: argparse.Namespace) -> dict[str, Any]:
    from stars.models.teachers import build_teacher_arch
    from stars.runtime import autocast, resolve_device

    device = resolve_device(cfg.device)
    _reset_peak()
    model: Any = build_teacher_arch(
        cfg.teacher.arch, num_classes=geo.num_classes, image_size=geo.image_size
    ).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.teacher_compile:
        model = torch.compile(model)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    b = args.teacher_batch
    x = torch.randn(b, 3, geo.image_size, geo.image_size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, geo.num_classes, (b,), device=device)
    model.train()

    def step() -> None:
        with autocast(device, cfg.precision):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()

    warm_s, per = _timed(step, args.warmup, args.teacher_iters)
    out = {
        "arch": cfg.teacher.arch,
        "batch": b,
        "compiled": bool(args.teacher_compile),
        "warmup_seconds": warm_s,
        "seconds_per_step": per,
        "images_per_s": b / per,
        "peak_gib": _peak_gib(),
    }
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per stage")
    parser.add_argument("--synth-iters", type=int, default=3)
    parser.add_argument("--kd-iters", type=int, default=20)
    parser.add_argument("--teacher-iters", type=int, default=30)
    parser.add_argument("--teacher-batch", type=int, default=128)
    parser.add_argument("--teacher-compile", action="store_true")
    parser.add_argument(
        "--skip", default="", help="comma-separated stages to skip: teacher, synthesis, kd"
    )
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    from stars.config import FastSynthesis, load_config
    from stars.pipeline import build_components, data_geometry

    cfg = load_config(args.config, args.overrides)
    geo = data_geometry(cfg)
    torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {
        "config": str(args.config),
        "overrides": args.overrides,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "precision": cfg.precision,
        "channels_last": cfg.channels_last,
        "compile": cfg.compile,
    }
    caught: list[str] = []

    def flush() -> None:
        result["warnings"] = sorted(set(caught))
        text = json.dumps(result, indent=2)
        print(text, flush=True)
        if args.json is not None:
            args.json.write_text(text + "\n")

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            if "teacher" not in skip:
                result["teacher_train"] = bench_teacher(cfg, geo, args)
                print(f"teacher train step: {result['teacher_train']}", flush=True)

            _reset_peak()
            t0 = time.perf_counter()
            comp = build_components(cfg)
            result["build_seconds"] = time.perf_counter() - t0
            synth = comp.synthesizer
            warm = cfg.synthesis.warmup_epochs if isinstance(cfg.synthesis, FastSynthesis) else 0
            synth.ctx.epoch = warm  # adversarial + STARS terms on, as in every KD epoch
            n_syn = cfg.synthesis.batch_size
            g_steps = getattr(cfg.synthesis, "g_steps", getattr(cfg.synthesis, "iterations", 1))

            if "synthesis" not in skip or "kd" not in skip:
                _reset_peak()
                warm_s, per = _timed(
                    lambda: synth.synthesize(comp.student),
                    max(args.warmup, 1),  # KD needs a filled memory bank
                    args.synth_iters if "synthesis" not in skip else 0,
                )
                if "synthesis" not in skip:
                    result["synthesis"] = {
                        "batch": n_syn,
                        "g_steps": g_steps,
                        "warmup_seconds": warm_s,
                        "seconds_per_batch": per,
                        "images_per_s": n_syn / per,
                        "generator_steps_per_s": g_steps / per,
                        "image_passes_per_s": n_syn * g_steps / per,
                        "peak_gib": _peak_gib(),
                    }
                    print(f"synthesis: {result['synthesis']}", flush=True)

            if "kd" not in skip:
                _reset_peak()
                b = cfg.distill.batch_size
                warm_s, per = _timed(
                    lambda: comp.distiller.step(synth.sample(b)), args.warmup, args.kd_iters
                )
                result["kd"] = {
                    "batch": b,
                    "T": cfg.student.T,
                    "warmup_seconds": warm_s,
                    "seconds_per_step": per,
                    "images_per_s": b / per,
                    "peak_gib": _peak_gib(),
                    "skipped_steps": comp.distiller.skipped,
                }
                print(f"KD: {result['kd']}", flush=True)

            if "synthesis" in result and "kd" in result:
                d = cfg.distill
                per_syn = result["synthesis"]["seconds_per_batch"]
                per_kd = result["kd"]["seconds_per_step"]
                syn_s = d.epochs * d.synthesis_steps_per_epoch * per_syn
                kd_s = max(d.epochs - warm, 0) * d.kd_steps_per_epoch * per_kd
                result["projection"] = {
                    "what": "full distillation of CONFIG, GPU steps only (no eval/IO)",
                    "synthesis_hours": syn_s / 3600,
                    "kd_hours": kd_s / 3600,
                    "total_hours": (syn_s + kd_s) / 3600,
                }
        finally:
            caught.extend(str(w.message).splitlines()[0][:300] for w in seen)
            flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
