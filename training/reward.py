"""What the Trainer needs from a reward, stated once.

rewards/ implements these (rewards/mix.py's RewardMix is the mix). training/ and rewards/ never import each
other, so the headless trainer can load both as top-level packages: a reward meets these protocols by its
shape alone.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores (B,) of images (B×H×W×C floats in 0..1) and their prompts, float32 on the CPU; higher is better."""


@runtime_checkable
class MixedReward(Protocol):
    """A reward made of several, which the Trainer treats as such: it scores an epoch's components piece by
    piece (sampling batches, one share per process), combines them once so every image is standardised on the
    same running statistics, and keeps those statistics in its checkpoint so a resumed run keeps its scale."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Mixed scores (B,): score_components then combine."""

    def score_components(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Every component's raw scores (B, M), without touching the running statistics."""

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Mixed scores (B,) from raw component scores (B, M); updates the running statistics first."""

    def state_dict(self) -> dict[str, Any]:
        """The running statistics, for the checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict()."""
