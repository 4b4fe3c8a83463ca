"""How far can the student get in a KD budget when the images are *real*? (A diagnostic.)

    python -m benchmarks.student_probe --steps 600 [--set student.neuron.v_threshold=0.5]

The data-free runs of ``paper_table`` train the student only on synthesized images. If
the student cannot fit the teacher even on real training images within the same number
of KD steps, the synthesis is not what limits it. This probe distills the bundled teacher
into the configured student (``benchmarks/paper_table/fast.yaml``'s student, distill and
evaluation settings, with ``--set`` overrides) on augmented real CIFAR-10 training images
*outside* the 5,000-image validation subset, for ``--steps`` KD steps, and reports top-1
on that validation subset plus the agreement with the teacher on the training batches and
the firing rate. ``--ann`` swaps every spiking neuron for ReLU and runs T = 1 (the same
architecture as an ANN: an upper bound for the spiking student). One JSON line per probe
goes to ``benchmarks/results/student_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmarks.perf import _ann_twin
from stars.config import RunConfig, StudentConfig, apply_overrides
from stars.data.datasets import build_data
from stars.distill.losses import kd_loss
from stars.distill.spikes import measure_spikes
from stars.evaluation import top1
from stars.models.factory import build_teacher
from stars.models.students import build_student
from stars.optim import build_optimizer, build_scheduler
from stars.runtime import tune_malloc

ROOT = Path(__file__).resolve().parents[1]
VAL_SEED = 12345  # the seed stars.pipeline uses to carve evaluation.split=val


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--ann", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/student_probe.jsonl")
    args = p.parse_args()
    tune_malloc()  # as the stars CLI does
    if args.threads:
        torch.set_num_threads(args.threads)
    tree = yaml.safe_load((ROOT / "benchmarks/paper_table/fast.yaml").read_text())
    cfg = RunConfig.model_validate(apply_overrides(tree, args.overrides))
    torch.manual_seed(args.seed)
    source = build_data(cfg.data)
    train_aug = source.train(augment=True)
    size = len(train_aug)  # type: ignore[arg-type]
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(VAL_SEED))
    val_idx = perm[: cfg.evaluation.val_size].sort().values.tolist()
    held = set(val_idx)
    train = Subset(train_aug, [i for i in range(size) if i not in held])
    val = Subset(source.train(augment=False), val_idx)
    d = cfg.distill
    loader = DataLoader(
        train,
        batch_size=d.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    teacher = build_teacher(cfg.teacher, num_classes=source.num_classes)
    scfg: StudentConfig = cfg.student
    student: nn.Module = build_student(
        scfg.model_copy(update={"T": 1}) if args.ann else scfg, num_classes=source.num_classes
    )
    if args.ann:
        student = _ann_twin(student)
    opt = build_optimizer(d.optimizer, student.parameters())
    sched = build_scheduler(d.schedule, opt, epochs=1, steps_per_epoch=args.steps)
    start = time.time()
    agree: list[float] = []
    step = 0
    student.train()
    while step < args.steps:
        for x, _ in loader:
            with torch.no_grad():
                t_logits = teacher(x)
            out = student(x)
            s_logits = out if out.dim() == 2 else out.mean(0)
            loss = kd_loss(s_logits, t_logits, temperature=d.temperature)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
            if step >= args.steps - 50:
                agree.append(float((s_logits.argmax(1) == t_logits.argmax(1)).float().mean()))
            step += 1
            if step >= args.steps:
                break
    seconds = time.time() - start
    acc = top1(student, DataLoader(val, batch_size=500), torch.device("cpu"))
    record: dict[str, Any] = {
        "steps": args.steps,
        "batch": d.batch_size,
        "ann": args.ann,
        "overrides": args.overrides,
        "seed": args.seed,
        "val_top1": acc,
        "train_agreement_last50": sum(agree) / max(len(agree), 1),
        "seconds": seconds,
    }
    if not args.ann:
        xs = next(iter(DataLoader(val, batch_size=64)))[0]
        stats = measure_spikes(student, xs, torch.device("cpu"))
        record["mean_firing_rate"] = stats.mean_firing_rate
    print(json.dumps(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
