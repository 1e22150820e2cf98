"""Stochastic DDIM with log-probabilities: the policy whose likelihood DDPO/DPOK/TexForce optimise.

Everything here works in the VP ("DDPM") space of diffusers and of DESIGN.md §3: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε.
ComfyUI's models live in k-diffusion space (x = x0 + σ ε); the helpers at the bottom convert, so a host
can call its model in its own space and hand ε̂ to `ddim_step`.

The step is always computed in fp32: a bf16/fp16 log-prob of a 16k-element latent overflows or loses the
1e-4 differences that the PPO clip range is about.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ of Stable Diffusion 1.x/2.x/XL ("scaled_linear" betas), fp32 on the CPU, as diffusers computes it."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> torch.Tensor:
    """Timesteps of diffusers' DDIMScheduler with "leading" spacing (SD's config), highest first.

    step_ratio = T // N; t_i = (N−1−i)·step_ratio + steps_offset. For N = 50: 981, 961, …, 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    max_steps = max_ddim_steps(num_train_timesteps, steps_offset)
    if num_steps > max_steps:
        raise ValueError(
            f"num_steps={num_steps} does not fit a {num_train_timesteps}-step schedule with steps_offset="
            f"{steps_offset}: the largest timestep would be out of range. Use at most {max_steps} steps.")
    step_ratio = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * step_ratio + steps_offset


def max_ddim_steps(num_train_timesteps: int = 1000, steps_offset: int = 1) -> int:
    """The most DDIM steps whose leading-spaced timesteps stay inside the schedule (999 for SD)."""
    # The largest timestep is (N−1)·(T//N) + offset; it must index ᾱ (≤ T−1). The bound only bites
    # once T//N = 1, so scanning down from T stops after a few iterations.
    for n in range(num_train_timesteps, 0, -1):
        if (n - 1) * (num_train_timesteps // n) + steps_offset <= num_train_timesteps - 1:
            return n
    return 0


@dataclass(frozen=True)
class DDIMSchedule:
    """The N steps of one sampling run: step i goes from timestep `timesteps[i]` (ᾱ = abar_t[i]) to abar_prev[i]."""

    timesteps: torch.Tensor  # (N,) long, highest first
    abar_t: torch.Tensor  # (N,) fp32
    abar_prev: torch.Tensor  # (N,) fp32; the last entry is ᾱ[0] (set_alpha_to_one=False)

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device: torch.device | str) -> "DDIMSchedule":
        return DDIMSchedule(self.timesteps.to(device), self.abar_t.to(device), self.abar_prev.to(device))

    # The sampler interface sampling.py and update.py use (a flow-matching schedule has the same methods):
    # `index` is one step for the whole batch (int) or each sample's own step ((B,) long tensor).
    def model_time(self, index: int | torch.Tensor, batch: int) -> torch.Tensor:
        """What the host's predictor takes for step `index`: the DDPM timestep, (B,)."""
        return per_batch(self.timesteps[index], batch)

    def step(self, x: torch.Tensor, pred: torch.Tensor, index: int | torch.Tensor, eta: float | torch.Tensor,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ddim_step for step `index` with the predictor's ε̂: (prev_sample, log_prob, mean, std)."""
        b = x.shape[0]
        return ddim_step(x, pred, per_batch(self.abar_t[index], b), per_batch(self.abar_prev[index], b), eta,
                         noise=noise, prev_sample=prev_sample)

    def x0(self, x: torch.Tensor, pred: torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
        """The clean latent the prediction implies at step `index`: (x − √(1−ᾱ)·ε̂)/√ᾱ, fp32."""
        abar = per_sample(self.abar_t[index], x)
        return (x.float() - torch.sqrt(1 - abar) * pred.float()) / torch.sqrt(abar)


def ddim_schedule(alphas_cumprod: torch.Tensor, num_steps: int, steps_offset: int = 1) -> DDIMSchedule:
    """Timesteps and the ᾱ pairs of each step, exactly as diffusers' DDIMScheduler (SD config) uses them.

    The previous timestep is t − T//N; below 0 it is "final_alpha_cumprod", which for SD
    (set_alpha_to_one=False) is ᾱ[0], not 1: that keeps the last step's σ finite and its log-prob defined.
    """
    abar = alphas_cumprod.detach().to(device="cpu", dtype=torch.float32)
    total = int(abar.shape[0])
    timesteps = ddim_timesteps(num_steps, total, steps_offset)
    prev = timesteps - total // num_steps
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], abar[0])
    return DDIMSchedule(timesteps, abar[timesteps].clone(), abar_prev)


def per_batch(value: torch.Tensor, batch: int) -> torch.Tensor:
    """A schedule entry for a whole batch: one step's 0-dim value repeated (B,), or per-sample values as they are."""
    return value.expand(batch) if value.ndim == 0 else value


def per_sample(value: float | torch.Tensor, like: torch.Tensor, what: str = "ᾱ") -> torch.Tensor:
    """A scalar or (B,) tensor as fp32, shaped to broadcast against `like` (B, C, H, W)."""
    v = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if v.ndim == 1:
        if v.shape[0] != like.shape[0]:
            raise ValueError(f"per-sample {what} has {v.shape[0]} entries for a batch of {like.shape[0]}")
        v = v.reshape(-1, *([1] * (like.ndim - 1)))
    elif v.ndim != 0:
        raise ValueError(f"{what} must be a scalar or a (B,) tensor, got shape {tuple(v.shape)}")
    return v


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float | torch.Tensor,
              abar_prev: float | torch.Tensor, eta: float | torch.Tensor, noise: torch.Tensor | None = None,
              prev_sample: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step x_t → x_prev and log p(x_prev | x_t), all in fp32.

    Give `noise` (standard normal, drawn by the caller from its own generator) to sample, or
    `prev_sample` to score a stored transition (training). ᾱ may be per sample, (B,), so a batch can
    hold different timesteps. Returns (prev_sample, log_prob (B,), mean, std); log_prob is the MEAN over
    the non-batch dimensions, which is the scale the PPO clip range 1e-4 is meant for. The gradient flows
    through `eps` (and so through the mean) only; prev_sample is treated as data.

    `eta` may also be a (B,) tensor with zeros (branch sampling): those samples take the deterministic DDIM step
    (σ 0, prev_sample = mean) and get log-prob 0, which is never trained.
    """
    if isinstance(eta, torch.Tensor):
        if eta.ndim != 1 or bool((eta < 0).any()):
            raise ValueError("a per-sample eta must be a (B,) tensor of values ≥ 0")
    elif not eta > 0:
        raise ValueError(f"eta must be > 0 for a stochastic DDIM step (got {eta}): with eta = 0 the step is "
                         "deterministic, σ = 0 and the log-probability is undefined (NaN). Use eta = 1.")
    if (noise is None) == (prev_sample is None):
        raise ValueError("pass exactly one of `noise` (to sample) or `prev_sample` (to score a stored step)")
    x = x_t.float()
    e = eps.float()
    at = per_sample(abar_t, x)
    ap = per_sample(abar_prev, x)
    x0 = (x - torch.sqrt(1 - at) * e) / torch.sqrt(at)
    std = per_sample(eta, x) * torch.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
    direction = torch.sqrt((1 - ap - std ** 2).clamp(min=0)) * e
    mean = torch.sqrt(ap) * x0 + direction
    if prev_sample is None:
        prev_sample = mean + std * noise.to(device=x.device, dtype=torch.float32)
    prev = prev_sample.detach().float()
    sd = torch.where(std > 0, std, torch.ones_like(std))  # σ 0 (a deterministic sample): scored as 0 below
    log_prob = -((prev - mean) ** 2) / (2 * sd ** 2) - torch.log(sd) - _LOG_SQRT_2PI
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    if isinstance(eta, torch.Tensor):
        log_prob = log_prob * (eta.to(log_prob.device) > 0)
    return prev, log_prob, mean, std


# --- conversions between parameterisations and spaces (pure functions, no state) -----------------

def eps_from_v(x: torch.Tensor, v: torch.Tensor, abar: float | torch.Tensor) -> torch.Tensor:
    """ε from a v-prediction (SD 2.x 768, some SDXL fine-tunes): ε = √ᾱ v + √(1−ᾱ) x, x in VP space."""
    a = per_sample(abar, x)
    return torch.sqrt(a) * v.float() + torch.sqrt(1 - a) * x.float()


def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, abar: float | torch.Tensor) -> torch.Tensor:
    """ε from a predicted clean latent: ε = (x − √ᾱ x0)/√(1−ᾱ), x in VP space."""
    a = per_sample(abar, x)
    return (x.float() - torch.sqrt(a) * x0.float()) / torch.sqrt(1 - a)


def sigma_from_abar(abar: float | torch.Tensor) -> torch.Tensor:
    """k-diffusion σ of a VP noise level: σ = √((1−ᾱ)/ᾱ) (what ComfyUI's apply_model takes)."""
    a = torch.as_tensor(abar, dtype=torch.float32)
    return torch.sqrt((1 - a) / a)


def abar_from_sigma(sigma: float | torch.Tensor) -> torch.Tensor:
    """ᾱ = 1/(1+σ²), the inverse of sigma_from_abar."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    return 1.0 / (1.0 + s * s)


def vp_to_k(x_vp: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """VP latent → k-diffusion input: x_k = x_vp·√(1+σ²) (= x_vp/√ᾱ)."""
    s = per_sample(sigma, x_vp)
    return x_vp * torch.sqrt(1 + s * s).to(x_vp.dtype)


def k_to_vp(x_k: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """k-diffusion latent → VP latent: x_vp = x_k/√(1+σ²)."""
    s = per_sample(sigma, x_k)
    return x_k / torch.sqrt(1 + s * s).to(x_k.dtype)


def eps_from_denoised_k(x_k: torch.Tensor, denoised: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """ε from ComfyUI's output (denoised x0 for the k-space input x_k = x0 + σ ε): ε = (x_k − x0)/σ."""
    s = per_sample(sigma, x_k)
    return (x_k.float() - denoised.float()) / s
