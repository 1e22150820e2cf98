"""The stochastic flow-matching step with log-probabilities (Flow-GRPO, arXiv 2505.05470): the policy for
rectified-flow models (SD 3.x, Flux), as `ddim.py`'s stochastic DDIM is for VP models.

Rectified flow: x_t = (1 − t)·x0 + t·ε, t from 1 (noise) to 0, velocity v = ε − x0 (what SD3/Flux predict;
ComfyUI's CONST models return x0 = x − t·v). The ODE sampler steps x_{t−Δ} = x_t − v·Δ. Flow-GRPO turns it into
an SDE with the same marginals at every t,

    x_{t−Δ} = x_t − [v + σ_t²/(2t)·(x_t + (1 − t)·v)]·Δ + σ_t·√Δ·ε,   σ_t = a·√(t/(1 − t)),

so each step is a Gaussian with an exact log-probability. `a` (the noise level, Flow-GRPO's 0.7) plays η's part.
At t = 1 σ_t is infinite; as in Flow-GRPO the first step's σ uses the next t instead. Everything is fp32, as in
ddim_step: the log-prob of a large latent in bf16 loses the differences the PPO clip range is about.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ddim import per_batch, per_sample

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def flow_sde_std(t: torch.Tensor, t_prev: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
    """σ_t = a·√(t/(1 − t)), with t = 1 (infinite σ) replaced by the step's next t, as Flow-GRPO does."""
    t_eff = torch.where(t >= 1, t_prev, t)
    return noise_level * torch.sqrt(t_eff / (1 - t_eff))


def flow_sde_step(x_t: torch.Tensor, velocity: torch.Tensor, t: float | torch.Tensor, t_prev: float | torch.Tensor,
                  noise_level: float | torch.Tensor = 0.7, noise: torch.Tensor | None = None,
                  prev_sample: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step x_t → x_{t_prev} (t_prev < t) and its log-probability, all in fp32.

    Give `noise` (standard normal, from the caller's generator) to sample, or `prev_sample` to score a stored
    transition. Returns (prev_sample, log_prob (B,), mean, std) with log_prob the MEAN over the non-batch
    dimensions (ddim_step's scale); the gradient flows through `velocity` only. t, t_prev and noise_level may be
    (B,) tensors; a noise level of 0 gives the deterministic Euler (ODE) step with log-prob 0 (branch sampling).
    """
    if (noise is None) == (prev_sample is None):
        raise ValueError("pass exactly one of `noise` (to sample) or `prev_sample` (to score a stored step)")
    x = x_t.float()
    v = velocity.float()
    tt = per_sample(t, x, "t")
    tp = per_sample(t_prev, x, "t_prev")
    a = per_sample(noise_level, x, "noise_level")
    if bool((tp >= tt).any()) or bool((tp < 0).any()) or bool((tt > 1).any()):
        raise ValueError("a flow step goes from t to a smaller t_prev, both in [0, 1]")
    if bool((a < 0).any()):
        raise ValueError("the noise level must be ≥ 0")
    dt = tt - tp  # Δ > 0
    sigma = flow_sde_std(tt, tp, a)
    mean = x - (v + sigma ** 2 / (2 * tt) * (x + (1 - tt) * v)) * dt
    std = sigma * torch.sqrt(dt)
    if prev_sample is None:
        prev_sample = mean + std * noise.to(device=x.device, dtype=torch.float32)
    prev = prev_sample.detach().float()
    sd = torch.where(std > 0, std, torch.ones_like(std))  # a deterministic sample: scored as 0 below
    log_prob = -((prev - mean) ** 2) / (2 * sd ** 2) - torch.log(sd) - _LOG_SQRT_2PI
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    stochastic = (std > 0).expand_as(x).reshape(x.shape[0], -1)[:, 0]
    return prev, log_prob * stochastic, mean, std


def velocity_from_denoised(x_t: torch.Tensor, denoised: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """v = (x_t − x0)/t: the velocity of a ComfyUI CONST (flow) model from its denoised output (x0 = x − t·v)."""
    tt = per_sample(t, x_t, "t")
    return (x_t.float() - denoised.float()) / tt


def shifted_times(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """N + 1 times from 1 to 0, uniform in s and shifted as ComfyUI's ModelSamplingDiscreteFlow / diffusers'
    FlowMatchEulerDiscreteScheduler shift them: t = shift·s / (1 + (shift − 1)·s) (SD3 uses shift 3, Flux's
    depends on the image size); fp32."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


@dataclass(frozen=True)
class FlowSchedule:
    """The N steps of one flow-matching run: step i goes from times[i] to times[i + 1] (times: N + 1, from 1 to 0).

    The sampler interface of ddim.DDIMSchedule (model_time, step, x0), so sampling and training run a
    rectified-flow model's chain through the same code; the predictor gives the velocity and takes the time t
    (ComfyUI's σ for CONST models) as its timestep, and `eta` is Flow-GRPO's noise level a."""

    times: torch.Tensor  # (N + 1,) fp32, descending, times[0] ≤ 1, times[-1] = 0

    def __len__(self) -> int:
        return int(self.times.shape[0]) - 1

    @property
    def timesteps(self) -> torch.Tensor:
        """The N times the model is called at (what Host.set_schedule is told)."""
        return self.times[:-1]

    def to(self, device: torch.device | str) -> "FlowSchedule":
        return FlowSchedule(self.times.to(device))

    def model_time(self, index: int | torch.Tensor, batch: int) -> torch.Tensor:
        return per_batch(self.times[index], batch)

    def step(self, x: torch.Tensor, pred: torch.Tensor, index: int | torch.Tensor, eta: float | torch.Tensor,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """flow_sde_step from times[index] to times[index + 1] with the predicted velocity."""
        index, b = torch.as_tensor(index), x.shape[0]
        return flow_sde_step(x, pred, per_batch(self.times[index], b), per_batch(self.times[index + 1], b), eta,
                             noise=noise, prev_sample=prev_sample)

    def x0(self, x: torch.Tensor, pred: torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
        """The clean latent the velocity implies at step `index`: x − t·v, fp32."""
        return x.float() - per_sample(self.times[torch.as_tensor(index)], x, "t") * pred.float()
