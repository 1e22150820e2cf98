"""The small interface between the RL core and whatever runs the models (ComfyUI objects, diffusers).

Everything the core needs from a host is here; the core never touches ComfyUI or diffusers itself.
Conditioning is a plain dict of tensors (e.g. {"cross_attn": B×L×D, "pooled": B×P}) so the core
can detach it at the encoder boundary and back-propagate into the encoder once per optimizer step.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Protocol

import torch

Cond = dict[str, torch.Tensor]
# predict(x, t) -> the guided prediction in fp32 that the run's schedule steps with (its model_time gives t):
# for a VP model ε̂, x the VP-space latent (B×C×h×w) and t the integer timesteps (B,) indexing alphas_cumprod;
# for a flow-matching model the velocity, x the flow's x_t and t its times in [0, 1] (B,). The host applies
# classifier-free guidance its own way (ComfyUI: through its sampling function, honouring model_options).
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Host(Protocol):
    device: torch.device
    alphas_cumprod: torch.Tensor | None  # (T,) fp32 on the CPU, T = 1000 for Stable Diffusion; None: flow model
    # optional: sampler_schedule(num_steps) -> ddim.DDIMSchedule | flow_step.FlowSchedule, the chain's steps
    # (a host without it gets DDIM on alphas_cumprod)
    # optional: uses_negative_prompt: bool, False when the model has no negative pass (Flux's distilled guidance):
    # the negative prompt is then encoded without gradient (training/sampling.py encode_negative)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent for an image of height × width pixels."""

    def encode(self, prompts: list[str]) -> Cond:
        """Conditioning through the LoRA'd text encoder(s); differentiable when grad is enabled."""

    def predictor(self, cond: Cond, uncond: Cond, guidance: float) -> AbstractContextManager[Predict]:
        """A context in which predict(x, t) evaluates the frozen denoiser with these conds."""

    def set_schedule(self, timesteps: torch.Tensor) -> None:
        """The run's model times (N,) (the schedule's `timesteps`), told once before sampling (ComfyUI: MODEL
        patches read them as sigmas)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VP-space latents -> images B×H×W×C in 0..1 (no gradient)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters, and nothing else."""

    def lora_enabled(self, enabled: bool) -> AbstractContextManager[None]:
        """Temporarily switch the LoRA off (DPOK's reference model is the same model without it)."""

    def training(self) -> AbstractContextManager[None]:
        """Set-up needed for a differentiable pass (ComfyUI: grad mode, weight wrappers); restored on exit."""

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights to checkpoint/save, in the pack's LoRA form (see training/lora)."""

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore weights written by lora_state()."""
