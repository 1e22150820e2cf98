"""Training settings: one dataclass, three named presets, and a check that rejects impossible combinations.

The arithmetic, with the `texforce` defaults (DESIGN.md §3):

    sampling per epoch   = images_per_epoch × num_steps denoiser calls (×2 for the guidance batch)
                         = 32 × 50 = 1600 image-steps
    trained timesteps    K = round(W × timestep_fraction) = 25 per image, a random subset per image of the
                         W = round(num_steps × train_window) = 50 steps of the window (the noisy end of the chain)
    training per epoch   = num_inner_epochs × images_per_epoch × K forward+backward passes
                         = 1 × 32 × 25 = 800 image-steps (each ≈ 3× a forward: training ≈ 1.5–2.5× sampling)
    one optimizer step   = train_batch_size × gradient_accumulation_steps images, all K timesteps each
                         = 2 × 8 = 16 images → images_per_epoch / 16 = 2 optimizer steps per epoch
    memory               = trajectories: images_per_epoch × (num_steps+1) latents (SD1 512²: 64 KiB each,
                           32 × 51 × 64 KiB ≈ 100 MiB) + the activations of one train_batch_size U-Net pass.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, fields
from typing import Any

from .advantages import ADVANTAGE_MODES
from .ddim import max_ddim_steps

log = logging.getLogger(__name__)

LOSSES = ("ppo", "sf", "rwr")
LR_SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """Settings that cannot work together; the message says what to change."""


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the `texforce` preset; see PRESETS for the others."""

    preset: str = "texforce"  # label only: which preset these values started from

    # --- sampling (cost: images_per_epoch × num_steps guided denoiser calls per epoch) ---------------
    num_steps: int = 50  # DDIM steps per image; sampling time is linear in it
    eta: float = 1.0  # DDIM stochasticity; must be in (0, 1]: eta = 0 has σ = 0 and no log-probability
    guidance: float = 5.0  # classifier-free guidance, the same at sampling and training (TexForce/DDPO: 5)
    height: int = 512  # pixels; a multiple of 8 (the VAE's downscale)
    width: int = 512
    negative_prompt: str = ""  # the unconditional prompt; it also goes through the LoRA'd encoder
    images_per_epoch: int = 32  # samples per epoch; more = less noisy gradient, linearly more time
    images_per_prompt: int = 4  # images of one prompt per epoch (group advantages need ≥ 2)
    sample_batch_size: int = 8  # images per sampling batch (memory only: does not change the math)

    # --- training (cost: num_inner_epochs × images_per_epoch × K forward+backward passes per epoch) --
    epochs: int = 100  # planned length of the run; sets the cosine schedule's horizon
    train_batch_size: int = 2  # images per micro-batch (memory: one U-Net backward of this batch ×2 for CFG)
    # Micro-batches per optimizer step; one step sees train_batch_size × this images, each at its K
    # timesteps. images_per_epoch must be a multiple of that product (32 / (2 × 8) = 2 steps per epoch).
    gradient_accumulation_steps: int = 8
    num_inner_epochs: int = 1  # passes over each epoch's samples (PPO reuse); 1 in all references
    timestep_fraction: float = 0.5  # K = round(W × this) trained timesteps per image (TexForce 0.5)
    # W = round(num_steps × train_window) steps from the noisy end of the chain are eligible for training. < 1 leaves
    # out the last, nearly clean steps: there the image is already decided, yet the log-prob gradient is largest
    # (it scales with 1/σ_t), so they dominate the update (Flow-GRPO and DanceGRPO train early steps only).
    train_window: float = 1.0
    # Branch sampling (MixGRPO / TempFlow-GRPO, with DanceGRPO's shared start noise). 0: every step of the chain
    # is stochastic (η) and K = timestep_fraction of the window is trained (DDPO). n ≥ 1: the images of a prompt
    # group start from the same noise and run deterministic DDIM (η 0) except at n steps drawn per group from the
    # window, where they take η's noise; exactly those n steps are trained (K = n, timestep_fraction unused). A
    # group's images then differ only by the noise of those steps, so the group baseline removes everything else
    # and each image's reward difference is credited to the steps that caused it: a far less noisy gradient, for
    # 1/K of the training cost, on the deterministic sampler users run.
    sde_steps: int = 0
    # True: the text encoder runs (forward + backward) once per distinct prompt per optimizer step, never more than
    # once per micro-batch (training/update.py StepEncoder); False: again at every trained timestep, the plain
    # reference form. The same gradient up to float rounding; the name predates the per-step encoding.
    encode_once_per_microbatch: bool = True

    # --- objective --------------------------------------------------------------------------------
    # "ppo" (DDPO-IS, several steps per epoch), "sf" (DDPO-SF, one step per epoch) or "rwr" (reward-weighted
    # regression of the clean-image prediction at the trained steps on where each chain ended; losses.regression_loss)
    loss: str = "ppo"
    clip_range: float = 1e-4  # PPO ε; tied to log-probs being means over latent elements
    adv_clip_max: float = 5.0  # advantages clipped to ±this in the loss
    kl_weight: float = 0.0  # DPOK β; > 0 costs one extra no-grad encoder + denoiser pass per trained step
    advantage: str = "per_prompt"  # "per_prompt" (DDPO), "batch" (Large-scale RL), "group" (GRPO-style),
    # "group_mean" (group baseline, one batch-wide scale: Dr. GRPO)
    stat_buffer_size: int = 32  # per-prompt tracker: rewards kept per prompt
    stat_min_count: int = 16  # per-prompt tracker: below this many, use the batch's statistics

    # --- optimizer (AdamW over the LoRA only) ----------------------------------------------------
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # "cosine" (linear warm-up, then cosine to 0 at `epochs`) or "constant"
    warmup_fraction: float = 0.05  # of all optimizer steps (epochs × steps per epoch), rounded, ≥ 1 if > 0
    max_grad_norm: float = 1.0  # clip of the global LoRA gradient norm

    # --- LoRA on the text encoder(s): built by the host; here so checkpoints can check it -----------
    lora_rank: int = 16
    lora_alpha: float = 16.0  # scale = alpha / rank

    seed: int = 0  # every random number of the run comes from generators seeded from this


# Presets: the reference values, as differences from the dataclass defaults (= texforce).
PRESETS: dict[str, dict[str, Any]] = {
    # TexForce (Chen et al. 2023; chaofengc/TexForce): LoRA r16/α16 on the CLIP text encoder, lr 3e-4,
    # guidance 5, half the timesteps trained, 50 steps, η 1, PPO ε 1e-4, no KL. Their trl config keeps
    # per-prompt statistics with buffer 32 / min_count 16; warm-up + cosine as DESIGN.md §3 asks.
    "texforce": {},
    # DDPO (Black et al. 2023; kvablack/ddpo-pytorch config/base.py + dgx.py): every timestep trained,
    # per-prompt stat tracking 16/16, constant learning rate without warm-up.
    "ddpo": {"timestep_fraction": 1.0, "stat_buffer_size": 16, "stat_min_count": 16,
             "lr_schedule": "constant", "warmup_fraction": 0.0},
    # DPOK (Fan et al. 2023): the policy gradient plus β·KL to the model without the LoRA. The paper's
    # code (google-research/dpok train_online_pg.py) defaults to kl_weight 0.01 (used in its single-prompt
    # runs; 0.1 for multi-prompt runs with a 100× larger reward weight). We keep 0.01: our policy term has
    # weight 1 on z-scored advantages, so 0.01 is already a stronger pull than theirs, not a weaker one.
    "dpok": {"kl_weight": 0.01},
    # fast: for small budgets (a CPU, minutes), not a paper's setting. What it changes and why (measured on the
    # embedded toy checkpoint, README "What training does to a pretrained model"):
    # - 20 steps; only steps of the first 60% of the chain are trained (train_window): the last, nearly clean
    #   steps carry the largest log-prob gradients but decide nothing the prompt controls;
    # - 128 images per epoch = 16 prompts × 8, advantages against each prompt's mean with one scale for the batch
    #   (group_mean): a per-group z-score would blow an all-right group's reward noise up to a real failure's size;
    # - branch sampling (sde_steps 1): a prompt's 8 images share their start noise and take noise at one step only,
    #   so their reward differences come from that step alone; training costs one step per image;
    # - reward-weighted regression (loss rwr) at that step: the clean-image prediction from the group's shared
    #   state is pulled towards its better images and away from its worse ones, a gradient that lies in the
    #   directions the images differ in, where the policy gradient is made of isotropic step noise (per image
    #   ≈ 1/7,600 signal to noise on the toy);
    # - 4 optimizer steps per epoch of 32 images (4 prompts each; micro-batches of 16), lr 1e-3 over 32 epochs.
    #   Arithmetic: 32 epochs × 128 = 4,096 images, 128 optimizer steps. The same images as 64 epochs × 64 (8
    #   prompts, 2 per step) but each step averages twice the prompts: through the node the held-out gain of
    #   three seeds went from +1.5 / +7.1 / +5.6 standard errors to +4.5 / +9.5 / +4.1 (README). On prompts the toy
    #   follows badly (rephrased) the previous fast (PPO on every stochastic step, lr 3e-4) gave −0.4.
    # Flow-GRPO (Liu et al. 2025; yifan123/flow_grpo config/base.py, grpo.py pickscore_sd3), for SD 3.x and Flux:
    # 10 sampling steps with SDE noise level 0.7 (eta, on a flow model), guidance 4.5, every step trained, advantages
    # against each prompt's group mean with one batch-wide std (their global_std: group_mean), β 0.01 (their
    # PickScore run; 0.04 for GenEval / OCR), PPO ε 1e-4, lr 3e-4 constant, two optimizer steps per epoch. Their
    # epoch is 48 prompts × 24 images on 32 GPUs; here 4 prompts × 12 = 48 images, 2 steps of 24.
    "flow_grpo": {"num_steps": 10, "eta": 0.7, "guidance": 4.5, "timestep_fraction": 1.0, "advantage": "group_mean",
                  "kl_weight": 0.01, "images_per_epoch": 48, "images_per_prompt": 12, "sample_batch_size": 12,
                  "train_batch_size": 12, "gradient_accumulation_steps": 2, "lr_schedule": "constant",
                  "warmup_fraction": 0.0},
    "fast": {"num_steps": 20, "train_window": 0.6, "timestep_fraction": 0.5, "images_per_epoch": 128,
             "images_per_prompt": 8, "sample_batch_size": 32, "train_batch_size": 16, "gradient_accumulation_steps": 2,
             "advantage": "group_mean", "lr": 1e-3, "clip_range": 1e-3, "epochs": 32, "sde_steps": 1, "loss": "rwr"},
}


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Accept what node widgets and JSON give (int for a float, float 3.0 for an int); refuse the rest."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{name} must be a {kind.__name__}, got {value!r} ({type(value).__name__})")


def make_config(preset: str = "texforce", **overrides: Any) -> TrainConfig:
    """The preset's values with `overrides` applied; unknown names are an error listing the valid ones."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = config_fields()
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; valid settings are: {', '.join(names)}")
    defaults = TrainConfig()
    values = {**PRESETS[preset], **overrides, "preset": preset}
    return dataclasses.replace(defaults, **{k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()})


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by config_to_dict (fields added since then keep their defaults)."""
    known = {k: v for k, v in values.items() if k in config_fields()}
    return dataclasses.replace(TrainConfig(), **known)


def window_steps(cfg: TrainConfig) -> int:
    """W, how many of the chain's first (noisiest) steps trained timesteps are drawn from."""
    return max(1, int(round(cfg.num_steps * cfg.train_window)))


def train_timesteps(cfg: TrainConfig) -> int:
    """K, the number of trained timesteps per image and inner epoch (the stochastic steps in branch sampling)."""
    if cfg.sde_steps > 0:
        return cfg.sde_steps
    return int(round(window_steps(cfg) * cfg.timestep_fraction))


def optimizer_steps_per_epoch(cfg: TrainConfig) -> int:
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
    return cfg.num_inner_epochs * max(1, math.ceil(cfg.images_per_epoch / per_step))


def total_optimizer_steps(cfg: TrainConfig) -> int:
    return cfg.epochs * optimizer_steps_per_epoch(cfg)


def warmup_steps(cfg: TrainConfig) -> int:
    if cfg.warmup_fraction <= 0:
        return 0
    return max(1, int(round(cfg.warmup_fraction * total_optimizer_steps(cfg))))


def validate(cfg: TrainConfig, schedule_length: int | None = 1000) -> list[str]:
    """Raise ConfigError listing every impossible setting (and what to change); return soft warnings.
    schedule_length: the model's discrete schedule (None: a flow-matching model, whose times are continuous)."""
    errors: list[str] = []
    warnings: list[str] = []

    def positive_int(name: str) -> bool:
        if getattr(cfg, name) < 1:
            errors.append(f"{name} must be at least 1 (got {getattr(cfg, name)})")
            return False
        return True

    ok = all([positive_int(n) for n in ("num_steps", "images_per_epoch", "images_per_prompt",
                                        "sample_batch_size", "train_batch_size", "gradient_accumulation_steps",
                                        "num_inner_epochs", "epochs", "lora_rank", "stat_buffer_size",
                                        "stat_min_count")])
    if not cfg.eta > 0:
        errors.append(f"eta = {cfg.eta}: the DDIM step needs noise to have a log-probability (σ = 0 gives NaN); "
                      "set eta to 1.0 (the reference value), or anything in (0, 1]")
    elif cfg.eta > 1:
        errors.append(f"eta = {cfg.eta} is above 1: the DDIM step's √(1 − ᾱ_prev − σ²) becomes imaginary; "
                      "use eta in (0, 1]")
    max_steps = max_ddim_steps(schedule_length) if schedule_length is not None else cfg.num_steps
    if cfg.num_steps > max_steps:
        errors.append(f"num_steps = {cfg.num_steps} is more than the model's {schedule_length}-step schedule "
                      f"allows ({max_steps}); use at most {max_steps} (50 is the reference)")
    if not 0 < cfg.timestep_fraction <= 1:
        errors.append(f"timestep_fraction = {cfg.timestep_fraction} must be in (0, 1]")
    elif not 0 < cfg.train_window <= 1:
        errors.append(f"train_window = {cfg.train_window} must be in (0, 1] (1 = every step may be trained)")
    elif cfg.num_steps >= 1 and train_timesteps(cfg) < 1:
        errors.append(f"timestep_fraction = {cfg.timestep_fraction} of the {window_steps(cfg)} steps in the training "
                      f"window trains 0 timesteps; raise it to at least {1 / window_steps(cfg):.3g}, widen "
                      "train_window or use more steps")
    if cfg.sde_steps < 0:
        errors.append(f"sde_steps = {cfg.sde_steps} must be 0 (every step stochastic) or a count of steps")
    elif cfg.sde_steps > window_steps(cfg):
        errors.append(f"sde_steps = {cfg.sde_steps} is more than the {window_steps(cfg)} steps of the training window "
                      f"(num_steps {cfg.num_steps} × train_window {cfg.train_window}); lower it or widen train_window")
    if ok:
        n = cfg.images_per_epoch
        if n % cfg.sample_batch_size:
            errors.append(f"images_per_epoch = {n} is not a multiple of sample_batch_size = {cfg.sample_batch_size}; "
                          f"use {_nearest_multiple(n, cfg.sample_batch_size)} images or a batch size that divides {n}")
        if n % cfg.images_per_prompt:
            errors.append(f"images_per_epoch = {n} is not a multiple of images_per_prompt = {cfg.images_per_prompt}; "
                          f"use {_nearest_multiple(n, cfg.images_per_prompt)} images per epoch")
        per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
        if n % per_step:
            errors.append(f"images_per_epoch = {n} is not a multiple of train_batch_size × gradient_accumulation_steps "
                          f"= {cfg.train_batch_size} × {cfg.gradient_accumulation_steps} = {per_step} (the images "
                          f"of one optimizer step); use {_nearest_multiple(n, per_step)} images per epoch or change "
                          "the accumulation")
        if cfg.advantage in ("group", "group_mean") and cfg.images_per_prompt < 2:
            errors.append(f"advantage {cfg.advantage!r} compares the images of one prompt: set images_per_prompt ≥ 2 "
                          "(4 or more is better), or use advantage 'batch'")
        if cfg.advantage == "per_prompt" and cfg.stat_min_count > cfg.stat_buffer_size:
            errors.append(f"stat_min_count = {cfg.stat_min_count} is larger than stat_buffer_size = "
                          f"{cfg.stat_buffer_size}: no prompt could ever use its own statistics; make the buffer "
                          "at least as large as min_count")
        if cfg.sde_steps > 0 and cfg.advantage in ("batch", "per_prompt"):
            warnings.append(f"branch sampling (sde_steps {cfg.sde_steps}) makes a prompt's images differ only by the "
                            f"noise of their branch steps, which a group baseline isolates; advantage "
                            f"{cfg.advantage!r} compares them with other prompts' images instead, so prompt difficulty "
                            "becomes advantage noise. Use advantage 'group_mean' or 'group'")
        if cfg.loss == "sf" and optimizer_steps_per_epoch(cfg) > 1:
            warnings.append("loss 'sf' (REINFORCE) is only unbiased for the first optimizer step after sampling; "
                            f"this config takes {optimizer_steps_per_epoch(cfg)} per epoch. Set "
                            f"gradient_accumulation_steps = {max(1, n // cfg.train_batch_size)} and "
                            "num_inner_epochs = 1, or use loss 'ppo'")
    for name in ("height", "width"):
        v = getattr(cfg, name)
        if v < 8 or v % 8:
            errors.append(f"{name} = {v} must be a positive multiple of 8 (the VAE downscale); "
                          f"use {max(8, _nearest_multiple(v, 8))}")
    if cfg.guidance < 0:
        errors.append(f"guidance = {cfg.guidance} must be ≥ 0 (5.0 is the reference)")
    if cfg.loss not in LOSSES:
        errors.append(f"loss {cfg.loss!r} is not one of {', '.join(LOSSES)}")
    if cfg.advantage not in ADVANTAGE_MODES:
        errors.append(f"advantage {cfg.advantage!r} is not one of {', '.join(ADVANTAGE_MODES)}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        errors.append(f"lr_schedule {cfg.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if not cfg.clip_range > 0:
        errors.append(f"clip_range = {cfg.clip_range} must be > 0 (1e-4 is the reference)")
    if not cfg.adv_clip_max > 0:
        errors.append(f"adv_clip_max = {cfg.adv_clip_max} must be > 0 (5 is the reference)")
    if not cfg.kl_weight >= 0:
        errors.append(f"kl_weight = {cfg.kl_weight} must be ≥ 0 (0 = no KL; DPOK uses 0.01–0.1)")
    if not cfg.lr > 0:
        errors.append(f"lr = {cfg.lr} must be > 0 (3e-4 is the reference)")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            errors.append(f"{name} = {getattr(cfg, name)} must be in [0, 1)")
    if not cfg.adam_eps > 0:
        errors.append(f"adam_eps = {cfg.adam_eps} must be > 0")
    if not cfg.weight_decay >= 0:
        errors.append(f"weight_decay = {cfg.weight_decay} must be ≥ 0")
    if not 0 <= cfg.warmup_fraction < 1:
        errors.append(f"warmup_fraction = {cfg.warmup_fraction} must be in [0, 1)")
    if not cfg.max_grad_norm > 0:
        errors.append(f"max_grad_norm = {cfg.max_grad_norm} must be > 0 (1.0 is the reference)")
    if not cfg.lora_alpha > 0:
        errors.append(f"lora_alpha = {cfg.lora_alpha} must be > 0 (usually equal to the rank)")
    if errors:
        raise ConfigError("training settings cannot work:\n- " + "\n- ".join(errors))
    for w in warnings:
        log.warning(w)
    return warnings


def _nearest_multiple(n: int, m: int) -> int:
    return max(m, int(round(n / m)) * m)
