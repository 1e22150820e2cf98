"""Calling the reward: one score per image, or a mix's components combined over the whole epoch.

A mix (training/reward.py's MixedReward) standardises each component on running statistics; scoring its
components batch by batch (and rank by rank) and combining the epoch once makes every image of an epoch
standardised on the same statistics, whatever the batch size or the number of processes.
"""
from __future__ import annotations

import torch

from .checkpoint import clone_cpu
from .reward import MixedReward, Reward


def score(reward: Reward, images: torch.Tensor, prompts: list[str], raw_components: bool = False) -> torch.Tensor:
    """Rewards (B,) float32 on the CPU; raw_components with a mix: its component scores (B, M) instead."""
    if raw_components and isinstance(reward, MixedReward):
        r = torch.as_tensor(reward.score_components(images, prompts)).detach().float().cpu()
        if r.ndim != 2 or r.shape[0] != len(prompts):
            raise ValueError(f"the reward mix returned components of shape {tuple(r.shape)} for {len(prompts)} images")
        return r
    r = torch.as_tensor(reward(images, prompts)).detach().float().reshape(-1).cpu()
    if r.numel() != len(prompts):
        raise ValueError(f"the reward function returned {r.numel()} values for {len(prompts)} images")
    return r


def combine(reward: Reward, raw: torch.Tensor) -> torch.Tensor:
    """One reward per sample: a mix's components (B, M) combined at once (this updates its statistics)."""
    if raw.ndim == 2:
        return torch.as_tensor(reward.combine(raw)).detach().float().reshape(-1).cpu()
    return raw


def combine_without_update(reward: Reward, raw: torch.Tensor) -> torch.Tensor:
    """`combine` for evaluation: the mix's statistics are put back afterwards, so evaluating between epochs
    leaves training exactly as it would have been."""
    if raw.ndim != 2:
        return raw
    saved = clone_cpu(reward.state_dict())
    try:
        return combine(reward, raw)
    finally:
        reward.load_state_dict(saved)

