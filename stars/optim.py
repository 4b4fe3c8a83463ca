"""Optimizers and per-step LR schedules from the config (shared by teacher training and
distillation)."""

from __future__ import annotations

import math
from typing import Any, assert_never

import torch

from stars.config import (
    AdamOptimizer,
    ConstantSchedule,
    CosineSchedule,
    OneCycleSchedule,
    OptimizerConfig,
    ScheduleConfig,
    SGDOptimizer,
    StepSchedule,
)

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(cfg: OptimizerConfig, params: Any) -> torch.optim.Optimizer:
    """The optimizer a config names."""
    match cfg:
        case SGDOptimizer():
            return torch.optim.SGD(
                params,
                lr=cfg.lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                nesterov=cfg.nesterov and cfg.momentum > 0,
            )
        case AdamOptimizer():
            cls = torch.optim.AdamW if cfg.kind == "adamw" else torch.optim.Adam
            return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        case _:
            assert_never(cfg)


def build_scheduler(
    cfg: ScheduleConfig, opt: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step LR schedule over ``epochs * steps_per_epoch`` steps (warm-up is linear)."""
    total = max(1, epochs * steps_per_epoch)
    if isinstance(cfg, OneCycleSchedule):
        max_lrs = [g["lr"] for g in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=max_lrs, total_steps=total, pct_start=cfg.pct_start
        )
    warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        match cfg:
            case CosineSchedule():
                base = opt.defaults["lr"]
                floor = cfg.min_lr / base if base > 0 else 0.0
                progress = (step - warm) / max(1, total - warm)
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            case StepSchedule():
                epoch = step // max(1, steps_per_epoch)
                return float(cfg.gamma ** sum(epoch >= m for m in cfg.milestones))
            case ConstantSchedule():
                return 1.0
            case _:
                assert_never(cfg)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
