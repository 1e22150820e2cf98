"""Several rewards as one objective: a weighted sum of per-reward standardised scores.

Raw scales differ by orders of magnitude (aesthetic ~5 ± 0.5, PickScore ~21 ± 1, JPEG −100 ± 30 kB), so a
plain weighted sum would let whichever reward has the widest spread decide everything. With `normalize`
(the default) each component's scores are standardised with the running mean and standard deviation of
every finite score that component has produced so far (this batch included):

    mixed = Σ_i w_i · (r_i − mean_i) / (std_i + 1e-6)

so a weight of 2 means twice the influence in units of that reward's own spread. Until a component has
seen two scores its std is unknown and its standardised score is 0. Without `normalize` it is Σ w_i · r_i.
The running statistics are in `state_dict()` so a resumed training run continues with the same scale.
A NaN/Inf component score makes the mixed score NaN (the training loop drops such samples) and is kept out
of the statistics.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch

from .base import RewardInputError

log = logging.getLogger("texforce.rewards")

RewardFn = Callable[..., torch.Tensor]


class RunningStats:
    """Welford mean/variance over every finite value seen (population std)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        for v in x[torch.isfinite(x)].double().tolist():
            self.count += 1
            d = v - self.mean
            self.mean += d / self.count
            self.m2 += d * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else float("nan")

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return torch.where(torch.isfinite(x), torch.zeros_like(x), x)
        return (x - self.mean) / (self.std + 1e-6)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class RewardMix:
    """Several rewards as one; it is the MixedReward of training/reward.py, which the Trainer scores by component."""

    def __init__(self, rewards: Sequence[RewardFn], weights: Sequence[float], normalize: bool = True):
        if not rewards:
            raise ValueError("a reward mix needs at least one reward")
        if len(rewards) != len(weights):
            raise ValueError(f"{len(rewards)} rewards but {len(weights)} weights")
        if any(not math.isfinite(float(w)) for w in weights):
            raise ValueError(f"reward weights must be finite numbers, got {list(weights)}")
        self.rewards, self.weights, self.normalize = list(rewards), [float(w) for w in weights], normalize
        names = [str(getattr(r, "name", type(r).__name__)) for r in self.rewards]
        self.names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self.stats = [RunningStats() for _ in self.rewards]
        self.name = "mix(" + ", ".join(f"{w:g}×{n}" for w, n in zip(self.weights, self.names)) + ")"
        self.last_components: dict[str, torch.Tensor] = {}

    def __call__(self, images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return self.combine(self.score_components(images, prompts))

    def score_components(self, images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Every component's raw scores, (B, M), without touching the running statistics.

        The trainer scores an epoch in pieces (sampling batches, or one share per process) and then calls
        `combine` once on all of them, so every image of the epoch is standardised on the same scale and all
        processes keep the same statistics.
        """
        columns = []
        for name, reward in zip(self.names, self.rewards):
            r = torch.as_tensor(reward(images, prompts)).detach().float().cpu().reshape(-1)
            if columns and r.shape != columns[0].shape:
                raise RewardInputError(f"reward {name} returned {r.numel()} scores, the others {columns[0].numel()}")
            columns.append(r)
        return torch.stack(columns, dim=1)

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Mixed scores (B,) from raw component scores (B, M); updates the running statistics first."""
        raw = torch.as_tensor(raw).float()
        if raw.ndim != 2 or raw.shape[1] != len(self.rewards):
            raise RewardInputError(f"expected raw scores of shape (B, {len(self.rewards)}), got {tuple(raw.shape)}")
        total = torch.zeros(raw.shape[0])
        for i, (w, stats) in enumerate(zip(self.weights, self.stats)):
            r = raw[:, i]
            if self.normalize:
                stats.update(r)
                r = stats.standardize(r)
            total = total + w * r
        self.last_components = {name: raw[:, i] for i, name in enumerate(self.names)}
        return total

    def reset(self) -> None:
        self.stats = [RunningStats() for _ in self.rewards]

    def state_dict(self) -> dict:
        return {"names": list(self.names), "weights": list(self.weights), "normalize": self.normalize,
                "stats": [s.state_dict() for s in self.stats]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(f"reward mix state is for {state['names']}, this mix has {self.names}")
        for s, st in zip(self.stats, state["stats"]):
            s.load_state_dict(st)
