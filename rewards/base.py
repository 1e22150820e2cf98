"""The input checks every reward shares.

What a reward is (images B×H×W×C floats in 0..1 and their prompts in, one score per image out) and what a mix
offers besides are stated once, on the Trainer's side, in training/reward.py (Reward, MixedReward): rewards/
and training/ never import each other, so a reward meets those protocols by its shape alone.
"""
from __future__ import annotations

import torch


class RewardInputError(ValueError):
    """Images or prompts a reward cannot score; the message says what was wrong."""


def check_batch(images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
    """Validate a B×H×W×C (C = 1, 3 or 4) image batch in 0..1 and the prompt list that goes with it."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RewardInputError(f"expected images as a B×H×W×C tensor with C = 1, 3 or 4, got {shape}")
    if images.shape[0] == 0:
        raise RewardInputError("the image batch is empty")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise RewardInputError(f"{images.shape[0]} images but {len(prompts)} prompts: give one prompt per image "
                               "(or a single prompt for all)")
    return images
