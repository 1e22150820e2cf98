"""The optimizer, its learning-rate schedule, and one optimizer step over every rank's gradient."""
from __future__ import annotations

import logging
import math

import torch

from .config import TrainConfig, total_optimizer_steps, warmup_steps
from .distributed import Group, sum_gradients

log = logging.getLogger(__name__)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` as a fraction of cfg.lr: a linear warm-up over warmup_steps
    ((step + 1) / (warm + 1), never 0), then constant, or a cosine to 0 at the end of cfg.epochs.

    A closed form of the step count rather than torch's chained LinearLR/CosineAnnealingLR: the factor of a
    step does not depend on float rounding accumulated over earlier steps, the checkpoint's scheduler state is
    just the step count, and a run resumed with a longer cfg.epochs stretches its cosine (a harmless change,
    training/checkpoint.py) instead of keeping the old horizon stored in the scheduler."""
    warm = warmup_steps(cfg)
    if step < warm:
        return (step + 1) / (warm + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total_optimizer_steps(cfg) - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on the LoRA parameters with the schedule of `lr_factor` (a LambdaLR: its state is the step count)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   params: list[torch.nn.Parameter], max_grad_norm: float, group: Group) -> float | None:
    """Sum the gradients over ranks, clip them and step; the gradients are cleared either way.

    Returns the gradient norm before clipping, or None when it was NaN/Inf and the step was skipped (one bad
    batch must not destroy the LoRA)."""
    sum_gradients(group, params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    stepped = math.isfinite(norm)
    if stepped:
        optimizer.step()
        scheduler.step()
    else:
        log.warning("skipping an optimizer step: the LoRA gradient norm is %s", norm)
    optimizer.zero_grad(set_to_none=True)
    return norm if stepped else None
