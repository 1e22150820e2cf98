"""Rewards → advantages: per-prompt stat tracking (DDPO), batch z-score (Large-scale RL), group z-score (GRPO),
group mean with one batch-wide scale (Dr. GRPO).

A = (r − μ)/(σ + 1e-6) with the population σ (as DDPO's numpy code). Clipping to ±A_max happens in the
loss. Non-finite rewards never reach these functions: `finite_mask` drops them first.
"""
from __future__ import annotations

import logging
from collections import deque

import torch

log = logging.getLogger(__name__)

ADVANTAGE_MODES = ("per_prompt", "batch", "group", "group_mean")
_EPS = 1e-6


class RewardError(ValueError):
    """The reward function returned nothing usable (e.g. every reward NaN/Inf)."""


def finite_mask(rewards: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
    """Boolean keep-mask of finite rewards; warns about the dropped ones and raises if none is left.

    A NaN/Inf reward (a reward model choking on a black image, a division by zero) must not be trained on:
    one NaN advantage turns every LoRA weight into NaN after the next optimizer step.
    """
    r = torch.as_tensor(rewards).detach().float().reshape(-1)
    keep = torch.isfinite(r)
    dropped = int((~keep).sum())
    if dropped == r.numel():
        raise RewardError(
            f"all {r.numel()} rewards are NaN or infinite; nothing can be trained on. Check the reward function "
            "(e.g. a reward model that is missing weights or receives images in the wrong range).")
    if dropped:
        which = ""
        if prompts is not None:
            bad = sorted({prompts[i] for i in torch.nonzero(~keep).flatten().tolist()})
            which = f" (prompts: {', '.join(repr(p[:60]) for p in bad[:5])}{' …' if len(bad) > 5 else ''})"
        log.warning("dropping %d of %d samples whose reward is NaN/Inf%s; they are not trained on",
                    dropped, r.numel(), which)
    return keep


def _zscore(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (values - mean) / (std + _EPS)


def _prompt_groups(prompts: list[str]) -> list[torch.Tensor]:
    """The indices of each distinct prompt's samples, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return [torch.tensor(idx, dtype=torch.long) for idx in groups.values()]


def batch_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """z-score over the whole epoch batch (Large-scale RL): robust with many prompts and one image each."""
    r = rewards.detach().double()
    return _zscore(r, r.mean(), r.std(unbiased=False)).float()


def group_advantages(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """z-score within the images of each prompt in this epoch (GRPO-style); needs ≥ 2 images per prompt."""
    r = rewards.detach().double()
    out = torch.empty_like(r)
    for idx in _prompt_groups(prompts):
        g = r[idx]
        out[idx] = _zscore(g, g.mean(), g.std(unbiased=False))
    return out.float()


def group_mean_advantages(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Each prompt's images against their own mean, all divided by one scale: the spread of those differences over
    the whole batch (Dr. GRPO, Liu et al. 2025, keeps the group baseline and drops the per-group σ).

    Why not the group z-score: a prompt the model already gets right gives images whose rewards differ by noise
    (0.981 vs 0.984); dividing by that group's tiny σ blows the noise up to advantages of ±1, as large as those of
    a group where one image got the prompt wrong. When most prompts are mostly right (a good pretrained model),
    those groups drown the signal and training drifts. Here such a group's advantages stay near 0, and the
    images that differ in what the reward measures carry the update.
    """
    r = rewards.detach().double()
    centred = torch.empty_like(r)
    for idx in _prompt_groups(prompts):
        centred[idx] = r[idx] - r[idx].mean()
    scale = centred.pow(2).mean().sqrt()  # the groups' pooled σ: the centred values already have mean 0
    return (centred / (scale + _EPS)).float()


class PerPromptStatTracker:
    """DDPO's per-prompt baseline: a deque of each prompt's recent rewards.

    Once a prompt has `min_count` rewards its advantages use that prompt's own mean/std (so easy prompts
    do not dominate); before that, the whole batch's statistics. State round-trips through plain
    dicts/lists so a checkpoint stays loadable with `weights_only=True`.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be at least 1")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add this epoch's rewards and return their advantages (same order as the inputs)."""
        r = rewards.detach().double().reshape(-1)
        if len(prompts) != r.numel():
            raise ValueError(f"{len(prompts)} prompts for {r.numel()} rewards")
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        out = torch.empty_like(r)
        for prompt in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], dtype=torch.long)
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(float(v) for v in r[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = hist.mean(), hist.std(unbiased=False)
            out[idx] = _zscore(r[idx], mean, std)
        return out.float()

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-prompt mean/std/count, for reports."""
        res = {}
        for prompt, buf in self.buffers.items():
            t = torch.tensor(list(buf), dtype=torch.float64)
            res[prompt] = {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "count": len(buf)}
        return res

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.buffers = {p: deque((float(v) for v in vals), maxlen=self.buffer_size)
                        for p, vals in state["buffers"].items()}


def compute_advantages(mode: str, rewards: torch.Tensor, prompts: list[str],
                       tracker: PerPromptStatTracker | None = None) -> torch.Tensor:
    """Advantages of finite rewards by `mode` ("per_prompt" needs the run's tracker)."""
    if mode == "per_prompt":
        if tracker is None:
            raise ValueError("advantage mode 'per_prompt' needs a PerPromptStatTracker")
        return tracker.update(prompts, rewards)
    if mode == "batch":
        return batch_advantages(rewards)
    if mode == "group":
        return group_advantages(rewards, prompts)
    if mode == "group_mean":
        return group_mean_advantages(rewards, prompts)
    raise ValueError(f"unknown advantage mode {mode!r}; use one of {', '.join(ADVANTAGE_MODES)}")
