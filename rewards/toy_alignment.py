"""The toy world's alignment reward: how well each image shows what its prompt names (toy/world.py).

GenEval in miniature: the prompt names a colour, shape, place and background; a programmatic scorer reads
them back from the image. `soft` (the default, for training) is the mean over the four attributes of the
probability the scorer gives the named value, a smooth reward in 0..1 that still moves when an image is
partly right; `strict` is GenEval's score: 1 when all four are read back right, else 0.
"""
from __future__ import annotations

import torch

from ..toy.world import alignment
from .base import check_batch

MODES = ("soft", "strict")


class ToyAlignmentReward:
    def __init__(self, mode: str = "soft"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.name = f"toy_alignment_{mode}"

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        return alignment(images[..., :3], list(prompts), strict=self.mode == "strict")
