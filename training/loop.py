"""The epoch loop: sample → reward → advantages → PPO/REINFORCE on the text-encoder LoRA → checkpoint.

One readable loop (`Trainer.run`) in the shape of ddpo-pytorch's scripts/train.py, talking to models only
through a Host (training/host.py). What it guarantees:
- log-probs are computed by the same fp32 `ddim_step` at sampling and training, from the same stored
  tensors, so before the first optimizer step of an epoch the importance ratio is exactly 1 on a
  batch-invariant host (the largest deviation is logged as `ratio_error_before_update`);
- the text encoder runs once per micro-batch: its outputs are detached into leaf tensors, the K trained
  timesteps back-propagate into those leaves, and the summed leaf gradients go through the encoder once
  (the same gradient as re-encoding at every timestep, by linearity);
- every random number comes from CPU torch.Generators seeded from cfg.seed and saved in the checkpoint
  (noise is drawn per image on the CPU and moved to the device), so runs are device-independent and a
  run resumed at epoch k ends with the same LoRA as one trained straight through;
- a checkpoint is written only at the end of a finished epoch; on any exception (cancel, Ctrl-C, an
  error) the trainer's in-memory state, LoRA included, goes back to the last finished epoch;
- with several processes (training/distributed.py) each rank samples and trains its contiguous share of
  the epoch, rewards are gathered before advantages and gradients summed before every optimizer step, so
  a run on N processes computes what one process computes on the same global batch.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .advantages import PerPromptStatTracker, compute_advantages, finite_mask
from .checkpoint import CheckpointError, check_config, load_checkpoint, prompts_digest, save_checkpoint
from .config import (TrainConfig, config_to_dict, total_optimizer_steps, train_timesteps, validate,
                     warmup_steps, window_steps)
from .ddim import ddim_schedule, ddim_step
from .distributed import SingleProcess
from .host import Cond, Host
from .lora.family import encoders_label, family_label
from .losses import PolicyLoss, dpok_kl, ppo_clip_loss, sf_loss
from .reward import MixedReward, Reward

log = logging.getLogger(__name__)

_SEED_RANGE = 2 ** 62


class TrainingCancelled(Exception):
    """Raised when should_stop() says so; the last finished epoch's checkpoint is on disk."""


@dataclass
class Trajectory:
    """One epoch's samples. latents[:, i] is the latent before DDIM step i, latents[:, i+1] after it."""

    prompts: list[str]
    latents: torch.Tensor | None  # (B, N+1, C, h, w) fp32 on the host device; None when not kept
    log_probs: torch.Tensor | None  # (B, N) fp32, log p of each stored transition under the sampling policy
    images: torch.Tensor  # (B, H, W, C) in 0..1, CPU
    rewards: torch.Tensor  # (B,) fp32, CPU (may hold NaN/Inf until filtered); (B, M) raw components of a mix
    advantages: torch.Tensor | None = None  # (B,) fp32, CPU

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
            advantages=None if self.advantages is None else self.advantages[idx])


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


def _clone(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples of tensors onto the CPU (snapshots must not alias live state)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return obj


def _expand(cond: Cond, batch: int) -> Cond:
    """A batch-1 conditioning (the negative prompt) as a batch of `batch` views; gradients sum back."""
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


def _leaves(cond: Cond) -> Cond:
    return {k: v.detach().requires_grad_(True) for k, v in cond.items()}


def step_groups(total: int, per_step: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Split samples 0…total−1 into ⌈total/per_step⌉ random groups of (at most) per_step, one per optimizer step.

    A stratified shuffle: the samples are cut into per_step consecutive blocks of S = ⌈total/per_step⌉ and each
    block gives one random member to every group. Groups are as random as a plain shuffle for the gradient
    (every sample is equally likely in every step), and with N processes holding contiguous shares, each rank
    holds exactly per_step/N members of every group whenever N divides per_step, so no rank waits for
    another at the gradient sum (a plain shuffle gives some ranks twice their share of a step). The groups
    depend only on total, per_step and the generator, never on the number of processes.
    """
    S = -(-total // per_step)
    slots = torch.stack([torch.randperm(S, generator=generator) for _ in range(per_step)])  # (block, position)
    index = torch.arange(total)
    step_of = slots[index // S, index % S]
    return [index[step_of == s] for s in range(S)]


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.stack(values).float().mean()) if values else 0.0


class Trainer:
    """Trains the host's text-encoder LoRA against `reward_fn(images, prompts) -> tensor[B]`."""

    def __init__(self, host: Host, reward_fn: Reward, prompts: list[str], cfg: TrainConfig,
                 checkpoint_path: str | os.PathLike | None = None,
                 on_epoch: Callable[[EpochStats], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, resume: bool = True, dist=None):
        self.prompts = [p.strip() for p in prompts if p and p.strip()]
        if not self.prompts:
            raise ValueError("no prompts to train on: give at least one non-empty prompt")
        validate(cfg, int(host.alphas_cumprod.shape[0]))
        self.dist = dist if dist is not None else SingleProcess()
        if cfg.images_per_epoch % self.dist.world_size:
            raise ValueError(f"images_per_epoch = {cfg.images_per_epoch} does not split over {self.dist.world_size} "
                             "processes: make it a multiple of the number of processes")
        per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
        if per_step % self.dist.world_size and self.dist.is_main:
            log.warning("an optimizer step's %d images do not split evenly over %d processes: some ranks wait for "
                        "others at every step; make train_batch_size × gradient_accumulation_steps a multiple of "
                        "the number of processes", per_step, self.dist.world_size)
        self.host, self.reward_fn, self.cfg = host, reward_fn, cfg
        self.checkpoint_path = checkpoint_path
        self.on_epoch, self.should_stop = on_epoch, should_stop
        self.schedule = ddim_schedule(host.alphas_cumprod, cfg.num_steps)
        self._sched = self.schedule.to(host.device)
        host.set_schedule(self.schedule.timesteps)
        self.K, self.W = train_timesteps(cfg), window_steps(cfg)
        self.params = list(host.trainable_parameters())
        if not self.params:
            raise ValueError("the host has no trainable (LoRA) parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self._lr_factor(step))
        self.tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)
        # Two streams, so that how much training draws never shifts which images get sampled.
        self.gen_sample = torch.Generator().manual_seed(cfg.seed)
        self.gen_train = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.last_images: torch.Tensor | None = None
        self.last_prompts: list[str] = []
        self.last_rewards: torch.Tensor | None = None
        self._reward_seconds = 0.0
        if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
            state = load_checkpoint(checkpoint_path)
            check_config(state["config"], cfg)
            self._check_model(state.get("model"), checkpoint_path)
            if state.get("prompts_sha256") != prompts_digest(self.prompts):
                log.warning("resuming %s with a different prompt list than it was trained on", checkpoint_path)
            self.load_state_dict(state)
            log.info("resumed from %s at epoch %d", checkpoint_path, self.epoch)
        self._snapshot = self.state_dict()

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def run(self, epochs: int | None = None) -> list[EpochStats]:
        """Train until `epochs` epochs are finished in total (default cfg.epochs); return this call's stats.

        On any exception the in-memory state returns to the last finished epoch before it propagates;
        that epoch's checkpoint is already on disk.
        """
        cfg, host = self.cfg, self.host
        target = cfg.epochs if epochs is None else int(epochs)
        if target > cfg.epochs:
            raise ValueError(f"run({target}) is past cfg.epochs = {cfg.epochs}, which sets the learning-rate "
                             "schedule; raise cfg.epochs instead")
        done: list[EpochStats] = []
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; trajectories need autograd
            try:
                while self.epoch < target:
                    # 1. sample this rank's share with the current LoRA (no grad) and score the images
                    t0 = time.perf_counter()
                    prompts = self._epoch_prompts()
                    lo, hi = self._shard(len(prompts))
                    traj = self.sample(prompts[lo:hi], self._draw_seed(self.gen_sample), keep=True, offset=lo,
                                       raw_components=True)
                    t1 = time.perf_counter()

                    # 2. every rank's rewards → advantages (the same on every rank); NaN/Inf rewards are
                    #    dropped, never trained on
                    rewards = self._combine(self.dist.all_gather(traj.rewards))
                    traj.rewards = rewards[lo:hi]
                    keep = finite_mask(rewards, prompts)
                    kept_prompts = [p for p, k in zip(prompts, keep.tolist()) if k]
                    advantages = torch.zeros(len(prompts))
                    advantages[keep] = compute_advantages(cfg.advantage, rewards[keep], kept_prompts, self.tracker)
                    batch = traj.select(keep[lo:hi])
                    batch.advantages = advantages[lo:hi][keep[lo:hi]]

                    # 3. train on a random K of each sample's timesteps, with gradient accumulation
                    with host.training(), torch.enable_grad():
                        info = self.train_on(batch, offset=int(keep[:lo].sum()), total=int(keep.sum()))
                    t2 = time.perf_counter()

                    # 4. a finished epoch: stats, checkpoint, then the caller's hook
                    self.epoch += 1
                    r = rewards[keep]
                    stats = EpochStats(
                        epoch=self.epoch, n_images=len(prompts), n_dropped=int((~keep).sum()),
                        reward_mean=float(r.mean()), reward_std=float(r.std(unbiased=False)),
                        reward_min=float(r.min()), reward_max=float(r.max()), loss=_mean(info["loss"]),
                        approx_kl=_mean(info["approx_kl"]), clipfrac=_mean(info["clipfrac"]), kl=_mean(info["kl"]),
                        grad_norm=float(sum(info["grad_norm"]) / max(1, len(info["grad_norm"]))),
                        lr=info["lr"], optimizer_steps=info["steps"], skipped_steps=info["skipped"],
                        ratio_error_before_update=float(torch.stack(info["ratio_errors"]).max())
                        if info["ratio_errors"] else 0.0,
                        seconds_sampling=max(0.0, t1 - t0 - self._reward_seconds),
                        seconds_reward=self._reward_seconds, seconds_training=t2 - t1)
                    self.last_images, self.last_prompts, self.last_rewards = traj.images, traj.prompts, traj.rewards
                    self._finish_epoch(stats)
                    done.append(stats)
            except BaseException:
                self.load_state_dict(self._snapshot)
                raise
        return done

    def _model_identity(self) -> dict[str, Any] | None:
        """The family and trained encoders of the host's model, when the host says (both hosts do)."""
        family, encoders = getattr(self.host, "family", None), getattr(self.host, "encoders", None)
        return {"family": family, "encoders": sorted(encoders)} if family and encoders else None

    def _check_model(self, saved: dict[str, Any] | None, path) -> None:
        here = self._model_identity()
        if saved and here and saved != here:
            def label(m: dict) -> str:
                return f"{encoders_label(m['encoders'])} of {family_label(m['family'], m['family'])}"
            raise CheckpointError(f"cannot resume {path}: it trained the {label(saved)}, but this run trains the "
                                  f"{label(here)}. Use the model and text-encoder choice it was trained with, or "
                                  "start a new run (another name / output folder, or resume off).")

    def _finish_epoch(self, stats: EpochStats) -> None:
        self.history.append(stats.as_dict())
        self._snapshot = self.state_dict()
        if self.checkpoint_path is not None and self.dist.is_main:  # every rank holds the same state
            save_checkpoint(self.checkpoint_path, self._snapshot)
        log.info("epoch %d/%d: reward %.4g ± %.3g (min %.4g, max %.4g, %d dropped), loss %.3g, approx_kl %.3g, "
                 "clipfrac %.3f, kl %.3g, grad_norm %.3g, lr %.3g, sampling %.1fs, training %.1fs",
                 stats.epoch, self.cfg.epochs, stats.reward_mean, stats.reward_std, stats.reward_min,
                 stats.reward_max, stats.n_dropped, stats.loss, stats.approx_kl, stats.clipfrac, stats.kl,
                 stats.grad_norm, stats.lr, stats.seconds_sampling, stats.seconds_training)
        if self.cfg.loss == "ppo" and stats.ratio_error_before_update > self.cfg.clip_range:
            log.warning("the importance ratio was %.3g away from 1 before the first update (clip range %.3g): "
                        "sampling and training compute different log-probs (precision or batch effects in the "
                        "host), so PPO clips from the start", stats.ratio_error_before_update, self.cfg.clip_range)
        if self.on_epoch is not None:
            self.on_epoch(stats)

    # ------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------
    def _epoch_prompts(self) -> list[str]:
        """images_per_epoch / images_per_prompt prompts, each prompt used evenly (fresh shuffles)."""
        cfg = self.cfg
        groups = cfg.images_per_epoch // cfg.images_per_prompt
        order: list[int] = []
        while len(order) < groups:
            order += torch.randperm(len(self.prompts), generator=self.gen_sample).tolist()
        return [self.prompts[i] for i in order[:groups] for _ in range(cfg.images_per_prompt)]

    def _shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n samples."""
        per = n // self.dist.world_size
        return self.dist.rank * per, (self.dist.rank + 1) * per

    def _combine(self, raw: torch.Tensor) -> torch.Tensor:
        """One reward per sample: a mix standardises the whole epoch's component scores at once."""
        if raw.ndim == 2:
            return torch.as_tensor(self.reward_fn.combine(raw)).detach().float().reshape(-1).cpu()
        return raw

    @staticmethod
    def _draw_seed(gen: torch.Generator) -> int:
        return int(torch.randint(0, _SEED_RANGE, (1,), generator=gen))

    def sample(self, prompts: list[str], seed: int, keep: bool = True, offset: int = 0,
               raw_components: bool = False) -> Trajectory:
        """Denoise, decode and score `prompts` (no grad); image i's noise comes from its own generator,
        seeded seed + offset + i, so samples depend neither on sample_batch_size nor on how an epoch is split
        over processes. keep=False: images and rewards only. raw_components: a reward mix's per-component
        scores (B, M) instead of mixed rewards, for `_combine` over the whole epoch.
        """
        cfg, host, sched = self.cfg, self.host, self._sched
        shape = host.latent_shape(cfg.height, cfg.width)
        n, bs, dev = len(prompts), cfg.sample_batch_size, host.device
        lat_parts, lp_parts, images, rewards = [], [], [], []
        self._reward_seconds = 0.0
        with torch.inference_mode(False), torch.no_grad():
            uncond1 = host.encode([cfg.negative_prompt])
            for start in range(0, n, bs):
                self._poll()
                batch_prompts = prompts[start:start + bs]
                b = len(batch_prompts)
                gens = [torch.Generator().manual_seed(seed + offset + start + i) for i in range(b)]

                def noise() -> torch.Tensor:
                    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)

                x = noise()
                lats, lps = [x], []
                cond = host.encode(batch_prompts)
                with host.predictor(cond, _expand(uncond1, b), cfg.guidance) as predict:
                    for i in range(len(sched)):
                        self._poll()
                        eps = predict(x, sched.timesteps[i].expand(b))
                        x, lp, _, _ = ddim_step(x, eps, sched.abar_t[i].expand(b), sched.abar_prev[i].expand(b),
                                                cfg.eta, noise=noise())
                        if keep:
                            lats.append(x)
                            lps.append(lp)
                if keep:
                    lat_parts.append(torch.stack(lats, dim=1))
                    lp_parts.append(torch.stack(lps, dim=1))
                img = host.decode(x).detach().float().cpu()
                images.append(img)
                t0 = time.perf_counter()
                rewards.append(self._score(img, batch_prompts, raw_components))
                self._reward_seconds += time.perf_counter() - t0
        return Trajectory(prompts=list(prompts), latents=torch.cat(lat_parts) if keep else None,
                          log_probs=torch.cat(lp_parts) if keep else None,
                          images=torch.cat(images), rewards=torch.cat(rewards))

    def _score(self, images: torch.Tensor, prompts: list[str], raw_components: bool = False) -> torch.Tensor:
        if raw_components and isinstance(self.reward_fn, MixedReward):
            r = torch.as_tensor(self.reward_fn.score_components(images, prompts)).detach().float().cpu()
            if r.ndim != 2 or r.shape[0] != len(prompts):
                raise ValueError(f"the reward mix returned components of shape {tuple(r.shape)} for {len(prompts)} images")
            return r
        r = torch.as_tensor(self.reward_fn(images, prompts)).detach().float().reshape(-1).cpu()
        if r.numel() != len(prompts):
            raise ValueError(f"the reward function returned {r.numel()} values for {len(prompts)} images")
        return r

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------
    def train_on(self, batch: Trajectory, offset: int = 0, total: int | None = None) -> dict[str, Any]:
        """One epoch's training on a sampled batch with advantages: num_inner_epochs passes over the epoch's
        samples in random groups of train_batch_size × gradient_accumulation_steps (see `step_groups`), one
        optimizer step per group, each group back-propagated in micro-batches of at most train_batch_size.

        With several processes, `batch` is this rank's share: samples offset … offset+len(batch)−1 of the
        `total` kept samples of the epoch. The groups and the timesteps are drawn for all `total` samples
        (the same on every rank), each rank back-propagates the members of a group it holds, and the
        gradients are summed over ranks before the step: the same groups, steps and result as one process.
        Call inside host.training(); `run` does."""
        cfg = self.cfg
        n = len(batch)
        total = n if total is None else int(total)
        per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
        info: dict[str, Any] = {"loss": [], "approx_kl": [], "clipfrac": [], "kl": [], "grad_norm": [],
                                "lr": self.optimizer.param_groups[0]["lr"], "steps": 0, "skipped": 0,
                                "ratio_errors": [], "updated": False}
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.num_inner_epochs):
            groups = step_groups(total, per_step, self.gen_train)
            # DDPO: a random subset of K timesteps per sample, the j-th column trained at micro-step j
            # (drawn from the first W steps of the chain, the training window)
            columns = torch.rand(total, self.W, generator=self.gen_train).argsort(dim=1)[:, :self.K]
            for group in groups:
                mine = group[(group >= offset) & (group < offset + n)]
                for idx in (mine.split(cfg.train_batch_size) if len(mine) else ()):  # (split of [] gives [[]])
                    scale = len(idx) / (per_step * self.K)
                    self.backward_microbatch(batch, idx - offset, columns[idx], scale, info)
                self._optimizer_step(info)
        return self._reduce_info(info)

    def _reduce_info(self, info: dict[str, Any]) -> dict[str, Any]:
        """Per-micro-step diagnostics averaged over every rank's micro-steps (identity on one process)."""
        if self.dist.world_size == 1:
            return info
        keys = ("loss", "approx_kl", "clipfrac", "kl")
        sums = torch.tensor([float(torch.stack(info[k]).float().sum()) if info[k] else 0.0 for k in keys]
                            + [float(len(info[k])) for k in keys])
        self.dist.all_reduce_sum([sums])
        for i, k in enumerate(keys):
            info[k] = [sums[i] / sums[len(keys) + i]] if sums[len(keys) + i] > 0 else []
        if info["ratio_errors"]:
            local = torch.stack(info["ratio_errors"]).max().float().cpu()
        else:
            local = torch.zeros(())
        info["ratio_errors"] = [self.dist.all_reduce_max(local.reshape(1))[0]]
        return info

    def backward_microbatch(self, batch: Trajectory, idx: torch.Tensor, columns: torch.Tensor, scale: float,
                            info: dict[str, Any] | None = None) -> None:
        """Accumulate (loss · scale) gradients of samples `idx` at their step indices `columns` (b × K)
        into the LoRA parameters. Public for tests and benchmarks; `run` is the normal entry point."""
        cfg, host, sched = self.cfg, self.host, self._sched
        info = info if info is not None else {"loss": [], "approx_kl": [], "clipfrac": [], "kl": [],
                                              "ratio_errors": [], "updated": True}
        dev = batch.latents.device
        b, k = columns.shape
        rows = torch.arange(b, device=dev)
        idx_d = idx.to(dev)
        latents, old_lp = batch.latents[idx_d], batch.log_probs[idx_d]
        adv = batch.advantages[idx].to(host.device)
        prompts = [batch.prompts[i] for i in idx.tolist()]
        cols = columns.to(dev)

        def step_inputs(j: int):
            c = cols[:, j]
            return latents[rows, c], latents[rows, c + 1], old_lp[rows, c], c

        mean_ref: list[torch.Tensor] = []
        if cfg.kl_weight > 0:  # DPOK's reference: the same model with the LoRA switched off
            with torch.no_grad(), host.lora_enabled(False):
                cond_ref = host.encode(prompts)
                uncond_ref = _expand(host.encode([cfg.negative_prompt]), b)
                with host.predictor(cond_ref, uncond_ref, cfg.guidance) as predict_ref:
                    for j in range(k):
                        x, x_next, _, c = step_inputs(j)
                        eps_ref = predict_ref(x, sched.timesteps[c])
                        mean_ref.append(ddim_step(x, eps_ref, sched.abar_t[c], sched.abar_prev[c], cfg.eta,
                                                  prev_sample=x_next)[2])

        def timestep_backward(predict, j: int) -> None:
            x, x_next, old, c = step_inputs(j)
            eps = predict(x, sched.timesteps[c])
            _, log_prob, mean, std = ddim_step(x, eps, sched.abar_t[c], sched.abar_prev[c], cfg.eta, prev_sample=x_next)
            out: PolicyLoss = (ppo_clip_loss(log_prob, old, adv, cfg.clip_range, cfg.adv_clip_max)
                               if cfg.loss == "ppo" else
                               sf_loss(log_prob, old, adv, cfg.adv_clip_max, cfg.clip_range))
            loss = out.loss
            if mean_ref:
                kl = dpok_kl(mean, mean_ref[j], std)
                loss = loss + cfg.kl_weight * kl
                info["kl"].append(kl.detach())
            (loss * scale).backward()
            info["loss"].append(out.loss.detach())
            info["approx_kl"].append(out.approx_kl)
            info["clipfrac"].append(out.clipfrac)
            if not info["updated"]:  # kept as tensors: no device sync per micro-step
                info["ratio_errors"].append((out.ratio - 1).abs().max())

        if cfg.encode_once_per_microbatch:
            cond, uncond = host.encode(prompts), host.encode([cfg.negative_prompt])
            self._check_grad_path(cond, uncond)
            cond_leaf, uncond_leaf = _leaves(cond), _leaves(uncond)
            with host.predictor(cond_leaf, _expand(uncond_leaf, b), cfg.guidance) as predict:
                for j in range(k):
                    self._poll()
                    timestep_backward(predict, j)
            # the K timesteps' gradients w.r.t. the conditioning, through the encoder in one pass
            outputs, grads = [], []
            for src, leaf in ((cond, cond_leaf), (uncond, uncond_leaf)):
                for key, tensor in src.items():
                    if leaf[key].grad is not None and tensor.requires_grad:
                        outputs.append(tensor)
                        grads.append(leaf[key].grad)
            if outputs:
                torch.autograd.backward(outputs, grads)
        else:
            for j in range(k):
                self._poll()
                cond, uncond = host.encode(prompts), host.encode([cfg.negative_prompt])
                self._check_grad_path(cond, uncond)
                with host.predictor(cond, _expand(uncond, b), cfg.guidance) as predict:
                    timestep_backward(predict, j)

    def log_probs(self, batch: Trajectory) -> torch.Tensor:
        """log p of every stored transition under the current LoRA, (B, N), no grad (diagnostics, tests)."""
        cfg, host, sched = self.cfg, self.host, self._sched
        out = []
        with torch.inference_mode(False), torch.no_grad():
            uncond1 = host.encode([cfg.negative_prompt])
            for start in range(0, len(batch), cfg.sample_batch_size):
                prompts = batch.prompts[start:start + cfg.sample_batch_size]
                lat = batch.latents[start:start + len(prompts)]
                b = len(prompts)
                cols = []
                with host.predictor(host.encode(prompts), _expand(uncond1, b), cfg.guidance) as predict:
                    for i in range(len(sched)):
                        eps = predict(lat[:, i], sched.timesteps[i].expand(b))
                        cols.append(ddim_step(lat[:, i], eps, sched.abar_t[i].expand(b), sched.abar_prev[i].expand(b),
                                              cfg.eta, prev_sample=lat[:, i + 1])[1])
                out.append(torch.stack(cols, dim=1))
        return torch.cat(out)

    @staticmethod
    def _check_grad_path(cond: Cond, uncond: Cond) -> None:
        if not any(v.requires_grad for v in list(cond.values()) + list(uncond.values())):
            raise RuntimeError("host.encode() returned conditioning without a gradient path to the LoRA inside "
                               "host.training(); the LoRA would never change. Check the host's training() set-up.")

    def _optimizer_step(self, info: dict[str, Any]) -> None:
        if self.dist.world_size > 1:  # the sum of every rank's share of this group's gradient
            present = torch.tensor([float(p.grad is not None) for p in self.params])
            for p in self.params:
                if p.grad is None:  # this rank held none of the group's samples (or the LoRA is unused)
                    p.grad = torch.zeros_like(p)
            self.dist.all_reduce_sum([p.grad for p in self.params] + [present])
            for p, n in zip(self.params, present.tolist()):
                if n == 0:  # no gradient on any rank, as on one process: AdamW leaves it alone (no decay)
                    p.grad = None
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        if not math.isfinite(norm):
            log.warning("skipping an optimizer step: the LoRA gradient norm is %s", norm)
            info["skipped"] += 1
        else:
            info["lr"] = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            info["grad_norm"].append(norm)
            info["steps"] += 1
            info["updated"] = True
        self.optimizer.zero_grad(set_to_none=True)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over warmup_steps, then constant or cosine to 0 at cfg.epochs."""
        cfg = self.cfg
        warm = warmup_steps(cfg)
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_optimizer_steps(cfg) - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def _poll(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled(f"training cancelled during epoch {self.epoch + 1}; "
                                    f"epoch {self.epoch} is the last finished one")

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str], seed: int, lora: bool = True) -> torch.Tensor:
        """Images (B, H, W, C) for `prompts` on noise fixed by `seed` (no grad); lora=False: the base model."""
        return self._fixed_noise_sample(prompts, seed, lora).images

    def evaluate(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Rewards (B,) of `prompts` on noise fixed by `seed`: comparable across epochs and runs."""
        return self._fixed_noise_sample(prompts, seed, True).rewards

    def _fixed_noise_sample(self, prompts: list[str], seed: int, lora: bool) -> Trajectory:
        base = self._draw_seed(torch.Generator().manual_seed(int(seed)))
        with torch.inference_mode(False), torch.no_grad(), self.host.lora_enabled(lora):
            traj = self.sample(list(prompts), base, keep=False, raw_components=True)
        if traj.rewards.ndim == 2:  # a mix: scored on its statistics, which evaluation must not move
            saved = _clone(self.reward_fn.state_dict())
            try:
                traj.rewards = self._combine(traj.rewards)
            finally:
                self.reward_fn.load_state_dict(saved)
        return traj

    # ------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as CPU copies (see training/checkpoint.py for the layout)."""
        return _clone({
            "epoch": self.epoch,
            "lora_state": self.host.lora_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stat_tracker": self.tracker.state_dict(),
            "rng": {"sample": self.gen_sample.get_state(), "train": self.gen_train.get_state()},
            "config": config_to_dict(self.cfg),
            "history": list(self.history),
            "prompts_sha256": prompts_digest(self.prompts),
            "model": self._model_identity(),  # None for a host that does not say
            # a reward with running statistics (a normalised mix) keeps its scale across a resume
            **({"reward_state": self.reward_fn.state_dict()} if isinstance(self.reward_fn, MixedReward) else {}),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict()/checkpoint. Runs outside inference mode: optimizer state created inside it
        could not be updated in place later."""
        with torch.inference_mode(False):
            state = _clone(state)  # the optimizer would otherwise share (and mutate) the given tensors
            self.host.load_lora_state(state["lora_state"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.tracker.load_state_dict(state["stat_tracker"])
            self.gen_sample.set_state(state["rng"]["sample"])
            self.gen_train.set_state(state["rng"]["train"])
            self.epoch = int(state["epoch"])
            self.history = list(state["history"])
            if "reward_state" in state and isinstance(self.reward_fn, MixedReward):
                self.reward_fn.load_state_dict(state["reward_state"])

