"""The epoch loop: sample → reward → advantages → PPO/REINFORCE on the text-encoder LoRA → checkpoint.

`Trainer.run` reads top to bottom like ddpo-pytorch's scripts/train.py and talks to models only through a Host
(training/host.py). The parts live beside it: sampling with log-probs (sampling.py), calling the reward
(scoring.py), advantages (advantages.py), the update of a micro-batch and the step groups (update.py), the
optimizer and its schedule (optim.py), what ranks exchange (distributed.py), checkpoints (checkpoint.py) and the
epoch's statistics (stats.py). What the loop guarantees:
- before the first optimizer step of an epoch the importance ratio is exactly 1 on a batch-invariant host
  (sampling and training compute log-probs with the same fp32 step from the same stored tensors; the largest
  deviation is logged as `ratio_error_before_update`);
- every random number comes from CPU torch.Generators seeded from cfg.seed and saved in the checkpoint, so runs
  are device-independent and a run resumed at epoch k ends with the same LoRA as one trained straight through;
- a checkpoint is written only at the end of a finished epoch; on any exception (cancel, Ctrl-C, an error) the
  trainer's in-memory state, LoRA included, goes back to the last finished epoch;
- with several processes each rank samples and trains its contiguous share of the epoch, rewards are gathered
  before advantages and gradients summed before every optimizer step, so a run on N processes computes what one
  process computes on the same global batch.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch

from .advantages import PerPromptStatTracker, compute_advantages, finite_mask
from .checkpoint import (check_config, check_model, clone_cpu, load_checkpoint, model_identity, prompts_digest,
                         save_checkpoint)
from .config import TrainConfig, config_to_dict, train_timesteps, validate, window_steps
from .ddim import ddim_schedule
from .distributed import SingleProcess, shard
from .host import Host
from .optim import make_optimizer, optimizer_step
from .reward import MixedReward, Reward
from .sampling import Trajectory, branch_steps, chain_log_probs, draw_seed, epoch_prompts, sample, step_mask
from .scoring import combine, combine_without_update, score
from .stats import EpochStats, log_epoch
from .update import MicroBatch, UpdateLog, backward_microbatch, backward_step, by_prompt, step_groups

__all__ = ["EpochStats", "Trainer", "TrainingCancelled", "Trajectory"]

log = logging.getLogger(__name__)


class TrainingCancelled(Exception):
    """Raised when should_stop() says so; the last finished epoch's checkpoint is on disk."""


class Trainer:
    """Trains the host's text-encoder LoRA against `reward_fn(images, prompts) -> tensor[B]`."""

    def __init__(self, host: Host, reward_fn: Reward, prompts: list[str], cfg: TrainConfig,
                 checkpoint_path: str | os.PathLike | None = None,
                 on_epoch: Callable[[EpochStats], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, resume: bool = True, dist=None):
        self.prompts = [p.strip() for p in prompts if p and p.strip()]
        if not self.prompts:
            raise ValueError("no prompts to train on: give at least one non-empty prompt")
        abar = getattr(host, "alphas_cumprod", None)  # None: a flow-matching model (continuous times)
        validate(cfg, None if abar is None else int(abar.shape[0]))
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
        # the chain's steps: DDIM for VP models, Flow-GRPO's SDE for flow models (a host that knows which says so)
        make_schedule = getattr(host, "sampler_schedule", None)
        self.schedule = make_schedule(cfg.num_steps) if make_schedule else ddim_schedule(abar, cfg.num_steps)
        self._sched = self.schedule.to(host.device)
        host.set_schedule(self.schedule.timesteps)
        self.K, self.W = train_timesteps(cfg), window_steps(cfg)
        self.params = list(host.trainable_parameters())
        if not self.params:
            raise ValueError("the host has no trainable (LoRA) parameters")
        self.optimizer, self.scheduler = make_optimizer(self.params, cfg)
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
            check_model(state.get("model"), model_identity(host), checkpoint_path)
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
                    prompts = epoch_prompts(self.prompts, cfg, self.gen_sample)
                    lo, hi = shard(self.dist, len(prompts))
                    seed = draw_seed(self.gen_sample)
                    columns = mask = None
                    if cfg.sde_steps:  # branch sampling: each group's stochastic (= trained) steps
                        columns = branch_steps(cfg, len(prompts), self.W, self.gen_sample)
                        mask = step_mask(columns, cfg.num_steps)[lo:hi]
                    traj = self.sample(prompts[lo:hi], seed, keep=True, offset=lo, raw_components=True,
                                       stochastic=mask, group=cfg.images_per_prompt if cfg.sde_steps else 1)
                    t1 = time.perf_counter()

                    # 2. every rank's rewards → advantages (the same on every rank); NaN/Inf rewards are
                    #    dropped, never trained on
                    rewards = combine(self.reward_fn, self.dist.all_gather(traj.rewards))
                    traj.rewards = rewards[lo:hi]
                    keep = finite_mask(rewards, prompts)
                    kept_prompts = [p for p, k in zip(prompts, keep.tolist()) if k]
                    advantages = torch.zeros(len(prompts))
                    advantages[keep] = compute_advantages(cfg.advantage, rewards[keep], kept_prompts, self.tracker)
                    batch = traj.select(keep[lo:hi])
                    batch.advantages = advantages[lo:hi][keep[lo:hi]]

                    # 3. train on a random K of each sample's timesteps, with gradient accumulation
                    with host.training(), torch.enable_grad():
                        update = self.train_on(batch, offset=int(keep[:lo].sum()), total=int(keep.sum()),
                                               columns=None if columns is None else columns[keep])
                    t2 = time.perf_counter()

                    # 4. a finished epoch: stats, checkpoint, then the caller's hook
                    self.epoch += 1
                    stats = EpochStats.of(self.epoch, rewards, keep, update,
                                          seconds_sampling=max(0.0, t1 - t0 - self._reward_seconds),
                                          seconds_reward=self._reward_seconds, seconds_training=t2 - t1)
                    self.last_images, self.last_prompts, self.last_rewards = traj.images, traj.prompts, traj.rewards
                    self._finish_epoch(stats)
                    done.append(stats)
            except BaseException:
                self.load_state_dict(self._snapshot)
                raise
        return done

    def _finish_epoch(self, stats: EpochStats) -> None:
        self.history.append(stats.as_dict())
        self._snapshot = self.state_dict()
        if self.checkpoint_path is not None and self.dist.is_main:  # every rank holds the same state
            save_checkpoint(self.checkpoint_path, self._snapshot)
        log_epoch(stats, self.cfg)
        if self.on_epoch is not None:
            self.on_epoch(stats)

    def sample(self, prompts: list[str], seed: int, keep: bool = True, offset: int = 0,
               raw_components: bool = False, stochastic: torch.Tensor | None = None, group: int = 1) -> Trajectory:
        """Denoise, decode and score `prompts` (no grad); see sampling.sample. raw_components: a reward mix's
        per-component scores (B, M) instead of mixed rewards, to combine over the whole epoch."""
        def score_batch(images: torch.Tensor, batch_prompts: list[str]) -> torch.Tensor:
            return score(self.reward_fn, images, batch_prompts, raw_components)

        traj, self._reward_seconds = sample(self.host, self.cfg, self._sched, prompts, seed, score_batch, self._poll,
                                            keep=keep, offset=offset, stochastic=stochastic, group=group)
        return traj

    def train_on(self, batch: Trajectory, offset: int = 0, total: int | None = None,
                 columns: torch.Tensor | None = None) -> UpdateLog:
        """One epoch's training on a sampled batch with advantages: num_inner_epochs passes over the epoch's
        samples in random groups of train_batch_size × gradient_accumulation_steps (see `step_groups`), one
        optimizer step per group, each group back-propagated in micro-batches of at most train_batch_size
        (`backward_step`).

        With several processes, `batch` is this rank's share: samples offset … offset+len(batch)−1 of the
        `total` kept samples of the epoch. The groups and the timesteps are drawn for all `total` samples
        (the same on every rank), each rank back-propagates the members of a group it holds, and the
        gradients are summed over ranks before the step: the same groups, steps and result as one process.
        `columns` ((total, K), branch sampling): each sample's stochastic steps, trained instead of a random draw.
        Call inside host.training(); `run` does."""
        cfg, n = self.cfg, len(batch)
        total = n if total is None else int(total)
        per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
        update = UpdateLog(lr=self.optimizer.param_groups[0]["lr"])
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.num_inner_epochs):
            groups = step_groups(total, per_step, self.gen_train)
            # DDPO: a random subset of K timesteps per sample, the j-th column trained at micro-step j
            # (drawn from the first W steps of the chain, the training window)
            cols = (columns if columns is not None
                    else torch.rand(total, self.W, generator=self.gen_train).argsort(dim=1)[:, :self.K])
            for group in groups:
                mine = group[(group >= offset) & (group < offset + n)]
                self.backward_step(batch, mine - offset, cols[mine], update)
                self._optimizer_step(update)
        return update.over_ranks(self.dist)

    def backward_step(self, batch: Trajectory, idx: torch.Tensor, columns: torch.Tensor,
                      update: UpdateLog | None = None) -> None:
        """Accumulate one optimizer step's gradient of samples `idx` (this rank's members of a step group) at their
        step indices `columns` into the LoRA parameters, in micro-batches of at most train_batch_size, the text
        encoder run once per step (update.backward_step). Public for tests and benchmarks."""
        cfg = self.cfg
        if cfg.encode_once_per_microbatch:
            idx, columns = by_prompt(batch.prompts, idx, columns)
        bs = cfg.train_batch_size
        micro = [MicroBatch.of(batch, i, c, self.host.device) for i, c in zip(idx.split(bs), columns.split(bs))
                 if len(i)]  # (split of [] gives [[]])
        backward_step(self.host, cfg, self._sched, micro, update if update is not None else UpdateLog(updated=True),
                      self._poll)

    def backward_microbatch(self, batch: Trajectory, idx: torch.Tensor, columns: torch.Tensor, scale: float,
                            update: UpdateLog | None = None) -> None:
        """Accumulate (loss · scale) gradients of samples `idx` at their step indices `columns` (b × K)
        into the LoRA parameters (update.backward_microbatch). Public for tests and benchmarks."""
        mb = MicroBatch.of(batch, idx, columns, self.host.device)
        backward_microbatch(self.host, self.cfg, self._sched, mb, scale,
                            update if update is not None else UpdateLog(updated=True), self._poll)

    def _optimizer_step(self, update: UpdateLog) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        norm = optimizer_step(self.optimizer, self.scheduler, self.params, self.cfg.max_grad_norm, self.dist)
        update.optimizer_step(norm, lr)

    def _poll(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled(f"training cancelled during epoch {self.epoch + 1}; "
                                    f"epoch {self.epoch} is the last finished one")

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------
    def log_probs(self, batch: Trajectory) -> torch.Tensor:
        """log p of every stored transition under the current LoRA, (B, N), no grad (diagnostics, tests)."""
        return chain_log_probs(self.host, self.cfg, self._sched, batch)

    def generate(self, prompts: list[str], seed: int, lora: bool = True) -> torch.Tensor:
        """Images (B, H, W, C) for `prompts` on noise fixed by `seed` (no grad); lora=False: the base model."""
        return self._fixed_noise_sample(prompts, seed, lora).images

    def evaluate(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Rewards (B,) of `prompts` on noise fixed by `seed`: comparable across epochs and runs."""
        return self._fixed_noise_sample(prompts, seed, True).rewards

    def _fixed_noise_sample(self, prompts: list[str], seed: int, lora: bool) -> Trajectory:
        base = draw_seed(torch.Generator().manual_seed(int(seed)))
        with torch.inference_mode(False), torch.no_grad(), self.host.lora_enabled(lora):
            traj = self.sample(list(prompts), base, keep=False, raw_components=True)
        traj.rewards = combine_without_update(self.reward_fn, traj.rewards)  # a mix: scored on its statistics
        return traj

    # ------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as CPU copies (see training/checkpoint.py for the layout)."""
        return clone_cpu({
            "epoch": self.epoch,
            "lora_state": self.host.lora_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stat_tracker": self.tracker.state_dict(),
            "rng": {"sample": self.gen_sample.get_state(), "train": self.gen_train.get_state()},
            "config": config_to_dict(self.cfg),
            "history": list(self.history),
            "prompts_sha256": prompts_digest(self.prompts),
            "model": model_identity(self.host),  # None for a host that does not say
            # a reward with running statistics (a normalised mix) keeps its scale across a resume
            **({"reward_state": self.reward_fn.state_dict()} if isinstance(self.reward_fn, MixedReward) else {}),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict()/checkpoint. Runs outside inference mode: optimizer state created inside it
        could not be updated in place later."""
        with torch.inference_mode(False):
            state = clone_cpu(state)  # the optimizer would otherwise share (and mutate) the given tensors
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
