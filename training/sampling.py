"""Sampling with log-probabilities: the epoch's prompts, the denoising chain, and re-scoring a stored chain.

Every random number comes from CPU torch.Generators: image i's noise from its own generator seeded
seed + offset + i, so samples depend neither on the batch size nor on how an epoch is split over processes,
and runs are device-independent. The log-prob of each transition is computed by the schedule's fp32 `step`
(ddim.DDIMSchedule.step), the one training uses, from the same stored tensors, so before the first update the
importance ratio is 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .config import TrainConfig
from .ddim import DDIMSchedule
from .host import Cond, Host

SEED_RANGE = 2 ** 62
Score = Callable[[torch.Tensor, list[str]], torch.Tensor]  # (images, prompts) -> rewards (B,) or components (B, M)


@dataclass
class Trajectory:
    """One epoch's samples. latents[:, i] is the latent before DDIM step i, latents[:, i+1] after it."""

    prompts: list[str]
    latents: torch.Tensor | None  # (B, N+1, C, h, w) fp32 on the host device; None when not kept
    log_probs: torch.Tensor | None  # (B, N) fp32, log p of each stored transition under the sampling policy
    images: torch.Tensor  # (B, H, W, C) in 0..1, CPU
    rewards: torch.Tensor  # (B,) fp32, CPU (may hold NaN/Inf until filtered); (B, M) raw components of a mix
    advantages: torch.Tensor | None = None  # (B,) fp32, CPU
    stochastic: torch.Tensor | None = None  # (B, N) bool, CPU: the steps that took noise (branch sampling); None: all

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, keep: torch.Tensor) -> "Trajectory":
        """The samples where `keep` (bool, (B,)) is True (self when all are kept: no copy)."""
        if bool(keep.all()):
            return self
        idx = torch.nonzero(keep.cpu()).flatten()
        dev_idx = idx.to(self.latents.device) if self.latents is not None else None
        return Trajectory(
            prompts=[self.prompts[i] for i in idx.tolist()],
            latents=None if self.latents is None else self.latents[dev_idx],
            log_probs=None if self.log_probs is None else self.log_probs[dev_idx],
            images=self.images[idx], rewards=self.rewards[idx],
            advantages=None if self.advantages is None else self.advantages[idx],
            stochastic=None if self.stochastic is None else self.stochastic[idx])


def expand(cond: Cond, batch: int) -> Cond:
    """A batch-1 conditioning (the negative prompt) as a batch of `batch` views; gradients sum back."""
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


def encode_negative(host: Host, cfg: TrainConfig) -> Cond:
    """The negative prompt's conditioning. A model without a negative pass (Flux's distilled guidance: the host's
    `uses_negative_prompt` is False) never reads it: it is encoded without gradient, so that the training pass keeps
    no encoder activations for it (a T5-XXL row is gigabytes)."""
    if getattr(host, "uses_negative_prompt", True):
        return host.encode([cfg.negative_prompt])
    with torch.no_grad():
        return host.encode([cfg.negative_prompt])


def draw_seed(gen: torch.Generator) -> int:
    """A base seed for a batch of per-image generators."""
    return int(torch.randint(0, SEED_RANGE, (1,), generator=gen))


def epoch_prompts(prompts: list[str], cfg: TrainConfig, gen: torch.Generator) -> list[str]:
    """images_per_epoch / images_per_prompt prompts, each prompt used evenly (fresh shuffles), each repeated
    images_per_prompt times in a row."""
    groups = cfg.images_per_epoch // cfg.images_per_prompt
    order: list[int] = []
    while len(order) < groups:
        order += torch.randperm(len(prompts), generator=gen).tolist()
    return [prompts[i] for i in order[:groups] for _ in range(cfg.images_per_prompt)]


def branch_steps(cfg: TrainConfig, n_images: int, window: int, gen: torch.Generator) -> torch.Tensor:
    """Branch sampling's stochastic steps: for each group of images_per_prompt consecutive images, sde_steps
    distinct steps of the first `window`, in random order (the order in which they are trained); (n_images,
    sde_steps) long, the same for every image of a group."""
    groups = n_images // cfg.images_per_prompt
    picks = torch.rand(groups, window, generator=gen).argsort(dim=1)[:, :cfg.sde_steps]
    return picks.repeat_interleave(cfg.images_per_prompt, dim=0)


def step_mask(columns: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, K) step indices → (B, num_steps) bool mask of those steps."""
    mask = torch.zeros(columns.shape[0], num_steps, dtype=torch.bool)
    return mask.scatter_(1, columns, True)


def sample(host: Host, cfg: TrainConfig, sched: DDIMSchedule, prompts: list[str], seed: int, score: Score,
           poll: Callable[[], None], keep: bool = True, offset: int = 0,
           stochastic: torch.Tensor | None = None, group: int = 1) -> tuple[Trajectory, float]:
    """Denoise, decode and score `prompts` (no grad), in batches of sample_batch_size; image i's noise comes
    from a generator seeded seed + offset + i. keep=False: images and rewards only. Returns the trajectory and
    the seconds spent in `score` (so sampling time can be told apart from reward time).

    Branch sampling: `stochastic` ((len(prompts), N) bool) says which steps take η's noise, the others are
    deterministic DDIM; `group` > 1 starts images offset+i of the same group of `group` consecutive images
    from the same noise (the first member's)."""
    shape = host.latent_shape(cfg.height, cfg.width)
    n, bs, dev = len(prompts), cfg.sample_batch_size, host.device
    lat_parts, lp_parts, images, rewards = [], [], [], []
    reward_seconds = 0.0
    with torch.inference_mode(False), torch.no_grad():
        uncond1 = host.encode([cfg.negative_prompt])
        for start in range(0, n, bs):
            poll()
            batch_prompts = prompts[start:start + bs]
            b = len(batch_prompts)
            gens = [torch.Generator().manual_seed(seed + offset + start + i) for i in range(b)]

            def noise() -> torch.Tensor:
                return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)

            x = noise()
            if group > 1:  # a group's start noise is its first member's own first draw
                firsts = [(offset + start + i) // group * group for i in range(b)]
                x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + f))
                                 for f in firsts]).to(dev)
            steps_on = None if stochastic is None else stochastic[start:start + b]
            lats, lps = [x], []
            with host.predictor(host.encode(batch_prompts), expand(uncond1, b), cfg.guidance) as predict:
                for i in range(len(sched)):
                    poll()
                    pred = predict(x, sched.model_time(i, b))
                    eta = cfg.eta if steps_on is None else cfg.eta * steps_on[:, i].float().to(dev)
                    x, lp, _, _ = sched.step(x, pred, i, eta, noise=noise())
                    if keep:
                        lats.append(x)
                        lps.append(lp)
            if keep:
                lat_parts.append(torch.stack(lats, dim=1))
                lp_parts.append(torch.stack(lps, dim=1))
            img = host.decode(x).detach().float().cpu()
            images.append(img)
            t0 = time.perf_counter()
            rewards.append(score(img, batch_prompts))
            reward_seconds += time.perf_counter() - t0
    traj = Trajectory(prompts=list(prompts), latents=torch.cat(lat_parts) if keep else None,
                      log_probs=torch.cat(lp_parts) if keep else None,
                      images=torch.cat(images), rewards=torch.cat(rewards),
                      stochastic=None if stochastic is None or not keep else stochastic.bool().cpu())
    return traj, reward_seconds


def chain_log_probs(host: Host, cfg: TrainConfig, sched: DDIMSchedule, batch: Trajectory) -> torch.Tensor:
    """log p of every stored transition under the host's current LoRA, (B, N), no grad: what sampling
    recorded, recomputed (the ratio-is-one check, diagnostics)."""
    out = []
    with torch.inference_mode(False), torch.no_grad():
        uncond1 = host.encode([cfg.negative_prompt])
        for start in range(0, len(batch), cfg.sample_batch_size):
            prompts = batch.prompts[start:start + cfg.sample_batch_size]
            lat = batch.latents[start:start + len(prompts)]
            b = len(prompts)
            steps_on = None if batch.stochastic is None else batch.stochastic[start:start + b]
            cols = []
            with host.predictor(host.encode(prompts), expand(uncond1, b), cfg.guidance) as predict:
                for i in range(len(sched)):
                    pred = predict(lat[:, i], sched.model_time(i, b))
                    eta = cfg.eta if steps_on is None else cfg.eta * steps_on[:, i].float().to(lat.device)
                    cols.append(sched.step(lat[:, i], pred, i, eta, prev_sample=lat[:, i + 1])[1])
            out.append(torch.stack(cols, dim=1))
    return torch.cat(out)
