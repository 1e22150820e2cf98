"""The policy update: which samples go into which optimizer step, and one micro-batch's backward pass.

A micro-batch is a few samples, each trained at K of its stored DDIM transitions (DDPO: a random subset of
timesteps). Its loss is PPO's clipped surrogate (or the score-function loss) of the transition's log-prob
under the current LoRA against the log-prob recorded at sampling, plus DPOK's β·KL to the model without the
LoRA when kl_weight > 0. The text encoder runs once per optimizer step (`backward_step`): its outputs are
detached into leaf tensors, every micro-batch's K timesteps back-propagate into the rows it uses, and the summed
leaf gradients go through the encoder once per distinct prompt (the same gradient as re-encoding at every
timestep, by linearity). `backward_microbatch` encodes per micro-batch (or, with encode_once_per_microbatch
off, per timestep: the plain reference form).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import TrainConfig
from .ddim import DDIMSchedule
from .distributed import Group
from .host import Cond, Host, Predict
from .losses import PolicyLoss, dpok_kl, ppo_clip_loss, regression_loss, sf_loss
from .sampling import Trajectory, encode_negative, expand


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


@dataclass
class UpdateLog:
    """What an epoch's updates did. Per-micro-step values stay tensors until the epoch ends (no device sync per
    step); ratio errors are recorded only until the first optimizer step (`updated`), when the ratio must be 1."""

    loss: list[torch.Tensor] = field(default_factory=list)  # policy loss, without the KL term
    approx_kl: list[torch.Tensor] = field(default_factory=list)
    clipfrac: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)  # DPOK's KL, unweighted; empty when kl_weight = 0
    ratio_errors: list[torch.Tensor] = field(default_factory=list)  # max |r − 1| per micro-step before an update
    grad_norm: list[float] = field(default_factory=list)  # before clipping, per optimizer step taken
    lr: float = 0.0  # of the last optimizer step taken
    steps: int = 0
    skipped: int = 0  # steps skipped for a NaN/Inf gradient
    updated: bool = False

    def micro_step(self, out: PolicyLoss, kl: torch.Tensor | None) -> None:
        self.loss.append(out.loss.detach())
        self.approx_kl.append(out.approx_kl)
        self.clipfrac.append(out.clipfrac)
        if kl is not None:
            self.kl.append(kl.detach())
        if not self.updated:
            self.ratio_errors.append((out.ratio - 1).abs().max())

    def optimizer_step(self, norm: float | None, lr: float) -> None:
        """Record a step taken at learning rate `lr` with gradient norm `norm` (None: skipped)."""
        if norm is None:
            self.skipped += 1
            return
        self.lr = lr
        self.grad_norm.append(norm)
        self.steps += 1
        self.updated = True

    def means(self) -> dict[str, float]:
        """loss, approx_kl, clipfrac and kl averaged over micro-steps, the gradient norm over steps, and the
        largest ratio error: the epoch's diagnostics."""
        return {"loss": _mean(self.loss), "approx_kl": _mean(self.approx_kl), "clipfrac": _mean(self.clipfrac),
                "kl": _mean(self.kl), "grad_norm": float(sum(self.grad_norm) / max(1, len(self.grad_norm))),
                "ratio_error_before_update": float(torch.stack(self.ratio_errors).max()) if self.ratio_errors
                else 0.0}

    def over_ranks(self, group: Group) -> "UpdateLog":
        """The per-micro-step diagnostics averaged over every rank's micro-steps, the ratio error the largest of
        any rank (itself on one process). Steps, norms and lr are the same on every rank already."""
        if group.world_size == 1:
            return self
        keys = ("loss", "approx_kl", "clipfrac", "kl")
        lists = [getattr(self, k) for k in keys]
        sums = torch.tensor([float(torch.stack(v).float().sum()) if v else 0.0 for v in lists]
                            + [float(len(v)) for v in lists])
        group.all_reduce_sum([sums])
        for i, k in enumerate(keys):
            setattr(self, k, [sums[i] / sums[len(keys) + i]] if sums[len(keys) + i] > 0 else [])
        local = torch.stack(self.ratio_errors).max().float().cpu() if self.ratio_errors else torch.zeros(())
        self.ratio_errors = [group.all_reduce_max(local.reshape(1))[0]]
        return self


@dataclass
class MicroBatch:
    """Samples of a trajectory with the DDIM steps each is trained at (columns: b × K step indices)."""

    latents: torch.Tensor  # (b, N+1, C, h, w)
    old_log_probs: torch.Tensor  # (b, N)
    advantages: torch.Tensor  # (b,) on the host device
    prompts: list[str]
    columns: torch.Tensor  # (b, K) on the latents' device

    @classmethod
    def of(cls, batch: Trajectory, idx: torch.Tensor, columns: torch.Tensor, device: torch.device) -> "MicroBatch":
        dev = batch.latents.device
        idx_d = idx.to(dev)
        return cls(batch.latents[idx_d], batch.log_probs[idx_d], batch.advantages[idx].to(device),
                   [batch.prompts[i] for i in idx.tolist()], columns.to(dev))

    def __len__(self) -> int:
        return len(self.prompts)

    def transition(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The j-th trained transition of every sample: x_t, x_{t−1}, its sampling log-prob, the step index."""
        c = self.columns[:, j]
        rows = torch.arange(len(self), device=self.latents.device)
        return self.latents[rows, c], self.latents[rows, c + 1], self.old_log_probs[rows, c], c


def reference_means(host: Host, cfg: TrainConfig, sched: DDIMSchedule, mb: MicroBatch,
                    ref: tuple[Cond, Cond] | None = None) -> list[torch.Tensor]:
    """DPOK's reference: the DDIM mean of each trained transition under the same model with the LoRA switched
    off (no grad); empty when kl_weight is 0. ref: the micro-batch's (cond, uncond) already encoded without the
    LoRA (ReferenceConds), else they are encoded here."""
    if cfg.kl_weight <= 0:
        return []
    means = []
    with torch.no_grad(), host.lora_enabled(False):
        cond, uncond = ref if ref is not None else (host.encode(mb.prompts), host.encode([cfg.negative_prompt]))
        with host.predictor(cond, expand(uncond, len(mb)), cfg.guidance) as predict:
            for j in range(mb.columns.shape[1]):
                x, x_next, _, c = mb.transition(j)
                pred = predict(x, sched.model_time(c, len(mb)))
                means.append(sched.step(x, pred, c, cfg.eta, prev_sample=x_next)[2])
    return means


def timestep_backward(predict: Predict, cfg: TrainConfig, sched: DDIMSchedule, mb: MicroBatch, j: int,
                      mean_ref: list[torch.Tensor], scale: float, log: UpdateLog) -> None:
    """Back-propagate (loss · scale) of the micro-batch's j-th trained transition."""
    x, x_next, old, c = mb.transition(j)
    pred = predict(x, sched.model_time(c, len(mb)))
    _, log_prob, mean, std = sched.step(x, pred, c, cfg.eta, prev_sample=x_next)
    if cfg.loss == "rwr":  # regress the clean-image prediction at x_t on where each chain ended
        out = regression_loss(sched.x0(x, pred, c), mb.latents[:, -1], mb.advantages, cfg.adv_clip_max)
    elif cfg.loss == "ppo":
        out = ppo_clip_loss(log_prob, old, mb.advantages, cfg.clip_range, cfg.adv_clip_max)
    else:
        out = sf_loss(log_prob, old, mb.advantages, cfg.adv_clip_max, cfg.clip_range)
    kl = dpok_kl(mean, mean_ref[j], std) if mean_ref else None
    loss = out.loss if kl is None else out.loss + cfg.kl_weight * kl
    (loss * scale).backward()
    log.micro_step(out, kl)


def _check_grad_path(cond: Cond, uncond: Cond) -> None:
    if not any(v.requires_grad for v in list(cond.values()) + list(uncond.values())):
        raise RuntimeError("host.encode() returned conditioning without a gradient path to the LoRA inside "
                           "host.training(); the LoRA would never change. Check the host's training() set-up.")


def _leaves(cond: Cond) -> Cond:
    return {k: v.detach().requires_grad_(True) for k, v in cond.items()}


def _encoder_backward(encoded: list[tuple[Cond, Cond]]) -> None:
    """Send the gradients accumulated in each (encoder output, its leaves) pair through the encoder, in one pass."""
    outputs, grads = [], []
    for src, leaf in encoded:
        for key, tensor in src.items():
            if leaf[key].grad is not None and tensor.requires_grad:
                outputs.append(tensor)
                grads.append(leaf[key].grad)
    if outputs:
        torch.autograd.backward(outputs, grads)


def backward_microbatch(host: Host, cfg: TrainConfig, sched: DDIMSchedule, mb: MicroBatch, scale: float,
                        log: UpdateLog, poll: Callable[[], None]) -> None:
    """Accumulate (loss · scale) gradients of the micro-batch's trained transitions into the LoRA parameters,
    encoding its prompts once (per timestep with encode_once_per_microbatch off). Call inside host.training()."""
    mean_ref = reference_means(host, cfg, sched, mb)
    b, k = mb.columns.shape
    if not cfg.encode_once_per_microbatch:  # the plain form: the encoder runs again for every timestep
        for j in range(k):
            poll()
            cond, uncond = host.encode(mb.prompts), encode_negative(host, cfg)
            _check_grad_path(cond, uncond)
            with host.predictor(cond, expand(uncond, b), cfg.guidance) as predict:
                timestep_backward(predict, cfg, sched, mb, j, mean_ref, scale, log)
        return
    cond, uncond = host.encode(mb.prompts), encode_negative(host, cfg)
    _check_grad_path(cond, uncond)
    cond_leaf, uncond_leaf = _leaves(cond), _leaves(uncond)
    with host.predictor(cond_leaf, expand(uncond_leaf, b), cfg.guidance) as predict:
        for j in range(k):
            poll()
            timestep_backward(predict, cfg, sched, mb, j, mean_ref, scale, log)
    _encoder_backward([(cond, cond_leaf), (uncond, uncond_leaf)])  # the K timesteps' gradients, in one pass


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step: the text encoder once per step
# ---------------------------------------------------------------------------------------------------------------
def by_prompt(prompts: list[str], idx: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """idx and its columns reordered so that each prompt's samples are consecutive (prompts in order of first
    appearance, samples in their order): micro-batches cut from it share as few prompts as possible, which bounds
    StepEncoder's memory. The step's gradient is a sum over samples, whatever their order."""
    names = [prompts[i] for i in idx.tolist()]
    first = {p: n for n, p in enumerate(dict.fromkeys(names))}
    order = torch.tensor(sorted(range(len(names)), key=lambda i: first[names[i]]), dtype=torch.long)
    return idx[order], columns[order]


def concat_rows(rows: list[Cond]) -> Cond:
    """One conditioning from rows of several encodings. Sequences of different lengths (a prompt over 77 tokens
    gives several chunks) are repeated to a common length, as ComfyUI's conditioning concat does: attention over a
    sequence repeated k times is the same attention."""
    out: Cond = {}
    for key in rows[0]:
        parts = [r[key] for r in rows]
        lengths = {t.shape[1] for t in parts if t.dim() >= 3}
        if len(lengths) > 1:
            n = math.lcm(*lengths)
            parts = [t.repeat(1, n // t.shape[1], *([1] * (t.dim() - 2))) for t in parts]
        out[key] = torch.cat(parts)
    return out


class StepEncoder:
    """The text encoder for one optimizer step's micro-batches: every distinct prompt is encoded (forward and
    backward) once per step and the negative prompt once, instead of once per micro-batch.

    Encoder outputs are detached into leaves whose rows the micro-batches take, so their gradients accumulate
    over the step. An encoding's graph is kept until the last micro-batch that uses its prompts has
    back-propagated (`release`), then the leaf gradients go through the encoder: by linearity the gradient of
    re-encoding for every micro-batch. Prompts are encoded together only when their last micro-batch is the same,
    so with micro-batches sorted by prompt (`by_prompt`) the graphs alive are those of the current micro-batch's
    prompts and the negative prompt: the memory of encoding once per micro-batch (training/memory_plan.py).
    """

    def __init__(self, host: Host, cfg: TrainConfig, micro_prompts: list[list[str]]):
        self.host = host
        self.last = {p: m for m, prompts in enumerate(micro_prompts) for p in prompts}  # a prompt's last micro-batch
        self.rows: dict[str, tuple[Cond, int]] = {}  # prompt -> (the leaves of its encoding, its row)
        self.pending: dict[int, list[tuple[Cond, Cond]]] = {}  # micro-batch -> (output, leaves) to release after it
        self._negative = encode_negative(host, cfg)
        self.uncond = self._hold(self._negative, len(micro_prompts) - 1)

    def _hold(self, encoded: Cond, until: int) -> Cond:
        leaves = _leaves(encoded)
        self.pending.setdefault(until, []).append((encoded, leaves))
        return leaves

    def cond(self, prompts: list[str]) -> Cond:
        """The conditioning rows of `prompts` (leaf views), encoding those this step has not seen yet."""
        new: dict[int, list[str]] = {}
        for p in dict.fromkeys(prompts):
            if p not in self.rows:
                new.setdefault(self.last[p], []).append(p)
        for until, batch in new.items():
            encoded = self.host.encode(batch)
            _check_grad_path(encoded, self._negative)
            leaves = self._hold(encoded, until)
            self.rows.update({p: (leaves, i) for i, p in enumerate(batch)})
        return concat_rows([{k: v[i:i + 1] for k, v in leaves.items()}
                            for leaves, i in (self.rows[p] for p in prompts)])

    def release(self, m: int) -> None:
        """Back-propagate through the encoder every encoding whose prompts micro-batch m used last."""
        _encoder_backward(self.pending.pop(m, []))


class ReferenceConds:
    """DPOK's reference conditioning for one step: its distinct prompts and the negative prompt encoded once
    without the LoRA (no grad), instead of once per micro-batch."""

    def __init__(self, host: Host, cfg: TrainConfig, prompts: list[str]):
        unique = list(dict.fromkeys(prompts))
        self.row = {p: i for i, p in enumerate(unique)}
        with torch.no_grad(), host.lora_enabled(False):
            self.cond, self.uncond = host.encode(unique), host.encode([cfg.negative_prompt])

    def of(self, prompts: list[str]) -> tuple[Cond, Cond]:
        """(cond, uncond) of `prompts`, as reference_means takes them."""
        return {k: v[torch.tensor([self.row[p] for p in prompts], device=v.device)]
                for k, v in self.cond.items()}, self.uncond


def step_scale(cfg: TrainConfig, mb: MicroBatch) -> float:
    """The micro-batch's weight in its optimizer step: its share of the step's per_step × K transitions."""
    return len(mb) / (cfg.train_batch_size * cfg.gradient_accumulation_steps * mb.columns.shape[1])


def backward_step(host: Host, cfg: TrainConfig, sched: DDIMSchedule, micro: list[MicroBatch], log: UpdateLog,
                  poll: Callable[[], None]) -> None:
    """Accumulate one optimizer step's gradient (each micro-batch's loss · step_scale) into the LoRA parameters,
    the text encoder run once per step (StepEncoder; per micro-batch and timestep with encode_once_per_microbatch
    off, the reference form). Sort the samples with by_prompt first. Call inside host.training()."""
    if not cfg.encode_once_per_microbatch:
        for mb in micro:
            backward_microbatch(host, cfg, sched, mb, step_scale(cfg, mb), log, poll)
        return
    if not micro:
        return
    encoder = StepEncoder(host, cfg, [mb.prompts for mb in micro])
    ref = ReferenceConds(host, cfg, [p for mb in micro for p in mb.prompts]) if cfg.kl_weight > 0 else None
    for m, mb in enumerate(micro):
        mean_ref = reference_means(host, cfg, sched, mb, ref.of(mb.prompts) if ref else None)
        with host.predictor(encoder.cond(mb.prompts), expand(encoder.uncond, len(mb)), cfg.guidance) as predict:
            for j in range(mb.columns.shape[1]):
                poll()
                timestep_backward(predict, cfg, sched, mb, j, mean_ref, step_scale(cfg, mb), log)
        encoder.release(m)
