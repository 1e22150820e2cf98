"""Policy losses over one denoising step: DDPO-IS (PPO clip), DDPO-SF (REINFORCE) and DPOK's KL term.

All inputs are per-sample fp32 log-probs (B,) from `ddim.ddim_step` (means over latent elements) and
per-sample advantages (B,). Advantages are clipped to ±A_max here, not in the advantage code, so the
logged rewards/advantages stay the raw ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyLoss:
    """A differentiable scalar loss and the PPO diagnostics (detached) for logging."""

    loss: torch.Tensor
    approx_kl: torch.Tensor  # ½ mean(Δlog p²): how far the policy moved from the sampling policy
    clipfrac: torch.Tensor  # fraction of samples whose ratio left [1−ε, 1+ε]
    ratio: torch.Tensor  # (B,) importance ratios, detached


def _diagnostics(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    delta = log_prob - old_log_prob
    ratio = torch.exp(delta)
    with torch.no_grad():
        approx_kl = 0.5 * torch.mean(delta.detach() ** 2)
        clipfrac = torch.mean((torch.abs(ratio.detach() - 1.0) > clip_range).float())
    return ratio, approx_kl, clipfrac


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float, adv_clip_max: float) -> PolicyLoss:
    """DDPO-IS: L = mean max(−A'r, −A' clamp(r, 1−ε, 1+ε)), r = exp(log p − log p_old), A' = clamp(A, ±A_max).

    The clip keeps several optimizer steps per epoch on-policy enough; with log-probs that are means
    over latent elements, ε = 1e-4 is the reference value.
    """
    adv = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    ratio, approx_kl, clipfrac = _diagnostics(log_prob.float(), old_log_prob.float(), clip_range)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    return PolicyLoss(loss, approx_kl, clipfrac, ratio.detach())


def sf_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
            adv_clip_max: float, clip_range: float = 1e-4) -> PolicyLoss:
    """DDPO-SF (REINFORCE): L = −mean(A' log p). Unbiased only for the first update after sampling.

    `old_log_prob` and `clip_range` only feed the diagnostics, so SF and IS runs log the same numbers.
    """
    adv = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    ratio, approx_kl, clipfrac = _diagnostics(log_prob.float(), old_log_prob.float(), clip_range)
    loss = -torch.mean(adv * log_prob.float())
    return PolicyLoss(loss, approx_kl, clipfrac, ratio.detach())


def regression_loss(x0_pred: torch.Tensor, x0: torch.Tensor, advantages: torch.Tensor, adv_clip_max: float
                    ) -> PolicyLoss:
    """Reward-weighted regression (RWR, Peters & Schaal 2007; Lee et al. 2023 for text-to-image) on the model's own
    chain: L = mean A'·‖x̂0(x_t) − x0‖²/2 over latent elements, x̂0 the model's clean-image prediction at a stored
    x_t of the chain and x0 the image that chain ended in.

    Its gradient A'(x̂0 − x0)·∇x̂0 points the prediction towards images that scored above their baseline and away
    from those below. Where a prompt group shares x_t (branch sampling) and its advantages sum to 0, x̂0 cancels and
    the group's gradient is −Σ A'x0·∇x̂0: the difference between its better and worse images, which lies in the
    few directions the images actually differ in, not in the isotropic step noise the policy gradient is made of.
    No importance ratio: the diagnostics are 0 and the ratios 1.
    """
    adv = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    per = ((x0_pred.float() - x0.detach().float()) ** 2).mean(dim=tuple(range(1, x0.ndim))) / 2
    zero = torch.zeros((), device=per.device)
    return PolicyLoss(torch.mean(adv * per), zero, zero, torch.ones_like(per).detach())


def dpok_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """DPOK's KL penalty for one denoising step: KL(N(μ_θ, σ_t²) ‖ N(μ_ref, σ_t²)) = (μ_θ − μ_ref)²/(2σ_t²).

    In the units of the log-prob (the mean over latent elements, as ddim_step's), averaged over the batch, so
    kl_weight weighs it against the policy term directly. The reference is the same model with the LoRA off
    (no gradient). μ is affine in ε̂ with a coefficient c_t, so this is c_t²/(2σ_t²)·(ε̂_θ − ε̂_ref)²: squared ε̂
    differences alone under-weigh the late steps, where σ_t is small, by orders of magnitude.
    """
    d = (mean.float() - mean_ref.detach().float()) ** 2 / (2 * std.detach().float() ** 2)
    return d.mean()
