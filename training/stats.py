"""What one epoch did, as plain numbers (JSON events, history.jsonl, checkpoints), and its log line."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .config import TrainConfig
from .update import UpdateLog

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """What one epoch did; plain numbers so it can go into JSON events and checkpoints."""

    epoch: int  # 1-based number of this epoch
    n_images: int
    n_dropped: int  # samples whose reward was NaN/Inf (not trained on)
    reward_mean: float
    reward_std: float
    reward_min: float
    reward_max: float
    loss: float  # mean policy loss over trained micro-steps (without the KL term)
    approx_kl: float  # ½ mean (log p − log p_old)²
    clipfrac: float
    kl: float  # DPOK: per-step KL to the model without the LoRA (unweighted); 0 when kl_weight = 0 (not computed)
    grad_norm: float  # mean LoRA gradient norm before clipping, over the epoch's optimizer steps
    lr: float  # learning rate of the epoch's last optimizer step
    optimizer_steps: int
    skipped_steps: int  # optimizer steps skipped because the gradient was NaN/Inf
    ratio_error_before_update: float  # max |r − 1| before the epoch's first update (0 on a batch-invariant host)
    seconds_sampling: float
    seconds_reward: float
    seconds_training: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, epoch: int, rewards: torch.Tensor, keep: torch.Tensor, update: UpdateLog, seconds_sampling: float,
           seconds_reward: float, seconds_training: float) -> "EpochStats":
        """The stats of an epoch from all its rewards, which of them were finite (`keep`), and its updates."""
        r = rewards[keep]
        return cls(epoch=epoch, n_images=len(rewards), n_dropped=int((~keep).sum()), reward_mean=float(r.mean()),
                   reward_std=float(r.std(unbiased=False)), reward_min=float(r.min()), reward_max=float(r.max()),
                   **update.means(), lr=update.lr, optimizer_steps=update.steps, skipped_steps=update.skipped,
                   seconds_sampling=seconds_sampling, seconds_reward=seconds_reward, seconds_training=seconds_training)


def log_epoch(stats: EpochStats, cfg: TrainConfig) -> None:
    """One line per epoch; a warning when PPO would clip before the first update (sampling and training
    compute different log-probs: precision or batch effects in the host)."""
    log.info("epoch %d/%d: reward %.4g ± %.3g (min %.4g, max %.4g, %d dropped), loss %.3g, approx_kl %.3g, "
             "clipfrac %.3f, kl %.3g, grad_norm %.3g, lr %.3g, sampling %.1fs, training %.1fs",
             stats.epoch, cfg.epochs, stats.reward_mean, stats.reward_std, stats.reward_min,
             stats.reward_max, stats.n_dropped, stats.loss, stats.approx_kl, stats.clipfrac, stats.kl,
             stats.grad_norm, stats.lr, stats.seconds_sampling, stats.seconds_training)
    if cfg.loss == "ppo" and stats.ratio_error_before_update > cfg.clip_range:
        log.warning("the importance ratio was %.3g away from 1 before the first update (clip range %.3g): "
                    "sampling and training compute different log-probs (precision or batch effects in the "
                    "host), so PPO clips from the start", stats.ratio_error_before_update, cfg.clip_range)
