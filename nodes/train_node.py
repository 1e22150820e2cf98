"""TexForceTrain: DDPO/PPO on a text-encoder LoRA, on the MODEL/CLIP/VAE the graph loaded, in this process."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch

import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..training.advantages import ADVANTAGE_MODES
from ..training.config import PRESETS, ConfigError, TrainConfig, make_config
from ..training.hosts.comfy import ComfyHost
from ..training.lora import LoraFileError, read_lora
from ..training.lora.family import family_of_comfy_config, native_size
from ..training.loop import TrainingCancelled
from ..training.memory_plan import check_fits, close_to_limit, plan_memory
from ..training.run import RunFiles, TrainingRun
from . import progress
from .lora_apply import ClipLayout, clip_patches, match_to_clip
from .lora_files import save_path
from .reward_curve import reward_curve_image
from .reward_nodes import Reward

log = logging.getLogger(__name__)
LORA_SUBFOLDER = "texforce"
EVENT = "texforce.progress"
# text_encoders setting -> the encoders ComfyHost trains (None: every text encoder of the model it covers)
ENCODER_CHOICES = {"all": None, "clip_l": ["clip_l"], "clip_g": ["clip_g"], "t5xxl": ["t5xxl"],
                   "clip_l+clip_g": ["clip_l", "clip_g"], "clip_l+t5xxl": ["clip_l", "t5xxl"],
                   "clip_g+t5xxl": ["clip_g", "t5xxl"]}
# gradient_checkpointing setting -> ComfyHost's (None: on unless the model runs on the CPU)
CHECKPOINTING_CHOICES = {"auto": None, "on": True, "off": False}
# optimizer steps per epoch when the node's optimizer_steps is 0 (auto)
NODE_OPTIMIZER_STEPS = {"fast": 4}


def run_dir(name: str) -> Path:
    """output/texforce/<name>/: the resumable checkpoint and the per-epoch history of a run."""
    lora = save_path(name, LORA_SUBFOLDER)
    rel = lora.relative_to(Path(folder_paths.get_folder_paths("loras")[0]).resolve() / LORA_SUBFOLDER)
    return Path(folder_paths.get_output_directory()) / "texforce" / rel.with_suffix("")


def _send(payload: dict) -> None:
    # JSON has no NaN: the browser's JSON.parse would drop the whole event (e.g. an epoch whose rewards were all NaN)
    payload = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in payload.items()}
    progress.record(payload, history_file=lambda name: run_dir(name) / "history.jsonl")  # for GET /texforce/runs
    try:
        from server import PromptServer

        if PromptServer.instance is not None:
            PromptServer.instance.send_sync(EVENT, payload)
    except Exception:  # no server (in-process use): the event only feeds the browser chart
        log.debug("no server to send %s to", EVENT)


def native_resolution(model) -> int:
    """The family's native size (the registry, training/lora/family.py) for this MODEL, or the size its config
    states (`texforce_native_size`: the embedded toy checkpoint is SD 1.x-shaped but draws 64×64)."""
    config = getattr(model.model, "model_config", None)
    stated = getattr(config, "texforce_native_size", None)
    if stated:
        return int(stated)
    return native_size(family_of_comfy_config(config),
                       isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION))


def node_accumulation(images_per_epoch: int, batch_size: int, preset: str, optimizer_steps: int = 0) -> int:
    """Micro-batches per optimizer step for the node's settings: `optimizer_steps` steps per epoch (0: the
    preset's, 2 or fast's 4); the preset's count falls back to one step per epoch when it does not divide."""
    micro = max(1, images_per_epoch // batch_size)
    if optimizer_steps:
        if micro % optimizer_steps:
            raise ConfigError(f"optimizer_steps = {optimizer_steps} does not divide the epoch's {micro} micro-batches "
                              f"(images_per_epoch {images_per_epoch} / batch_size {batch_size}); use a divisor of "
                              f"{micro}, or 0 for the preset's")
        return micro // optimizer_steps
    wanted = NODE_OPTIMIZER_STEPS.get(preset, 2)
    return micro // wanted if micro % wanted == 0 and micro >= wanted else micro


def node_config(*, preset: str, epochs: int, images_per_epoch: int, images_per_prompt: int, batch_size: int,
                width: int, height: int, steps: int, guidance: float, eta: float, learning_rate: float,
                lora_rank: int, kl_weight: float, advantage: str, seed: int, optimizer_steps: int = 0,
                sde_steps: int = -1, native_size: Callable[[], int]) -> TrainConfig:
    """The run's settings from the node's widgets, every rule in one place. Widgets override the preset; four
    keep a special value that saved workflows rely on, meaning "the preset's" or "the model's":
    - width / height 0: the model family's native size (`native_size()`, asked only then);
    - kl_weight −1: the preset's β (dpok's 0.01, 0 for the others);
    - advantage "preset": the preset's advantage mode;
    - optimizer_steps 0: the preset's optimizer steps per epoch, as gradient accumulation (node_accumulation);
    - sde_steps −1: the preset's branch sampling (0 = every step stochastic).
    batch_size is both the sampling batch and the training micro-batch (memory only); lora_alpha is the rank."""
    if not width or not height:
        size = native_size()
        width, height = width or size, height or size
    overrides = dict(epochs=epochs, images_per_epoch=images_per_epoch, images_per_prompt=images_per_prompt,
                     sample_batch_size=batch_size, train_batch_size=batch_size,
                     gradient_accumulation_steps=node_accumulation(images_per_epoch, batch_size, preset,
                                                                   optimizer_steps),
                     width=width, height=height, num_steps=steps, guidance=guidance, eta=eta, lr=learning_rate,
                     lora_rank=lora_rank, lora_alpha=float(lora_rank), seed=seed)
    if kl_weight >= 0:
        overrides["kl_weight"] = kl_weight
    if advantage != "preset":
        overrides["advantage"] = advantage
    if sde_steps >= 0:
        overrides["sde_steps"] = sde_steps
    return make_config(preset, **overrides)


def check_memory(host: ComfyHost, cfg: TrainConfig) -> None:
    """Before the first epoch: the run's estimated peak memory (training/memory_plan.py) against what ComfyUI
    reports free on the model's device; refuses, saying what to lower, when it cannot fit."""
    inputs = host.memory_inputs(cfg)
    if inputs is None:
        log.warning("TexForce: no memory plan for this model (the plan walks ComfyUI's U-Nets, SD 3.x's MMDiT and "
                    "Flux): an out-of-memory error is not caught before the first epoch.")
        return
    plan = plan_memory(inputs)
    available, device = host.available_memory()
    log.info("TexForce memory plan on %s (%.2f GiB available): %s", device, available / 2**30, plan.describe())
    check_fits(plan, available, device)
    warning = close_to_limit(plan, available, device)
    if warning:
        log.warning("TexForce: %s", warning)


def _prompt_list(text: str) -> list[str]:
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise ConfigError("prompts is empty: write one training prompt per line.")
    return prompts


class TexForceTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceTrain",
            display_name="TexForce Train (DDPO on text encoder)",
            category="TexForce/training",
            is_output_node=True,
            description="Trains a LoRA on the text encoder with reinforcement learning (DDPO/PPO; DPOK's KL as "
                        "an option) against a reward, on the loaded checkpoint. Saves to models/loras/texforce/ "
                        "every epoch; Cancel keeps the last finished epoch and the run can be resumed.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to sample with (frozen). U-Net LoRAs and "
                                                "model patches on it are used during training."),
                io.Clip.Input("clip", tooltip="The text encoder the LoRA is trained on (left unchanged)."),
                io.Vae.Input("vae", tooltip="Decodes samples for the reward."),
                Reward.Input("reward", tooltip="What to maximise (a TexForce reward node)."),
                io.String.Input("prompts", multiline=True, default="a photo of a cat\na photo of a dog",
                                tooltip="Training prompts, one per line (lines starting with # are skipped)."),
                io.Combo.Input("preset", options=list(PRESETS), default="texforce",
                               tooltip="texforce: PPO, half the timesteps, no KL. ddpo: all timesteps, constant lr. "
                                       "dpok: adds a KL penalty to the model without the LoRA."),
                io.Int.Input("epochs", default=20, min=1, max=100000,
                             tooltip="Total epochs of the run (a resumed run continues up to this)."),
                io.Int.Input("images_per_epoch", default=32, min=1, max=4096,
                             tooltip="Samples per epoch. Time per epoch is linear in it; more gives a less noisy "
                                     "gradient."),
                io.Int.Input("images_per_prompt", default=4, min=1, max=256,
                             tooltip="Images of one prompt per epoch (group advantages need ≥ 2)."),
                io.Int.Input("batch_size", default=4, min=1, max=256,
                             tooltip="Images per sampling batch and per training micro-batch: memory only. "
                                     "images_per_epoch must be a multiple of it."),
                io.Int.Input("width", default=0, min=0, max=4096, step=8,
                             tooltip="Sample width in pixels. 0 = auto: the model family's native size (512 for "
                                     "SD 1.x and SD 2.x base, 768 for SD 2.x v-prediction, 1024 for SDXL, SD 3.x "
                                     "and Flux). Time per epoch grows with width × height."),
                io.Int.Input("height", default=0, min=0, max=4096, step=8,
                             tooltip="Sample height in pixels. 0 = auto, as for width."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM steps per sample. Sampling time is linear in it; half are trained "
                                     "(texforce preset)."),
                io.Float.Input("guidance", default=5.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance, the same at sampling and training. On Flux it "
                                       "is the distilled guidance the model takes as input (~3.5 for Flux dev; "
                                       "no negative pass, the negative prompt is unused)."),
                io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Sampling noise: DDIM's η, or on a flow-matching MODEL Flow-GRPO's noise level a (0.7 "
                                       "there). Must be > 0 (the log-probability needs noise); 1 is DDIM's reference."),
                io.Float.Input("learning_rate", default=3e-4, min=0.0, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate for the LoRA (3e-4 reference), with warm-up + cosine."),
                io.Int.Input("lora_rank", default=16, min=1, max=256,
                             tooltip="LoRA rank (alpha = rank). 16 is TexForce's (1.18 M parameters on SD 1.x)."),
                io.Float.Input("kl_weight", default=-1.0, min=-1.0, max=10.0, step=0.001,
                               tooltip="DPOK's β (KL to the model without the LoRA); -1 = the preset's value. "
                                       "Costs one extra no-grad pass per trained step when > 0."),
                io.Combo.Input("advantage", options=["preset", *ADVANTAGE_MODES], default="preset",
                               tooltip="How rewards become advantages: per-prompt running statistics (DDPO), the "
                                       "whole batch (large-scale RL), the images of each prompt (GRPO), or each "
                                       "prompt's mean with one scale for the batch (group_mean, Dr. GRPO: a prompt "
                                       "the model already gets right adds little noise)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seeds the LoRA init, prompts, noise and timestep choice: same seed, same run."),
                io.String.Input("lora_name", default="texforce_run",
                                tooltip="Saved as models/loras/texforce/<name>.safetensors; the checkpoint goes to "
                                        "output/texforce/<name>/."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue this run from its checkpoint. Off: refuse if the run exists "
                                         "(nothing is overwritten)."),
                io.Combo.Input("text_encoders", options=list(ENCODER_CHOICES), default="all", optional=True,
                               tooltip="Which text encoder(s) get the LoRA. all: every one the CLIP has (SD 1.x: "
                                       "CLIP-L, SD 2.x: OpenCLIP-H, SDXL: CLIP-L and CLIP-G, SD 3.x: CLIP-L, "
                                       "CLIP-G and T5-XXL, Flux: CLIP-L and T5-XXL). The others train only those "
                                       "named: clip_l (te1), clip_g (te2; makes SDXL's pooled output), t5xxl (te3; "
                                       "what SD 3.x and Flux read most: a T5-XXL LoRA is ~12M parameters at rank "
                                       "16), or a pair; an encoder the CLIP does not have is refused."),
                io.Int.Input("optimizer_steps", default=0, min=0, max=4096, optional=True,
                             tooltip="Optimizer steps per epoch: images_per_epoch / batch_size micro-batches are "
                                     "split into this many gradient-accumulation groups. 0 = the preset's (2; "
                                     "fast: 4). More steps learn faster per sample, with noisier steps; it must "
                                     "divide images_per_epoch / batch_size."),
                io.Combo.Input("gradient_checkpointing", options=list(CHECKPOINTING_CHOICES), default="auto",
                               optional=True,
                               tooltip="Recompute the U-Net's layers during backward instead of keeping their "
                                       "activations: much less memory for the training pass, about one more "
                                       "U-Net forward of time; the same gradient. auto = on on a GPU, off on the "
                                       "CPU. Before the first epoch the run's memory is estimated and a run that "
                                       "cannot fit is refused, saying what to lower."),
                io.Int.Input("sde_steps", default=-1, min=-1, max=1000, optional=True,
                             tooltip="Branch sampling: 0 = every DDIM step takes noise and half the window's steps "
                                     "are trained (DDPO, TexForce). n ≥ 1 = the images of a prompt start from the "
                                     "same noise and take noise at only n steps (drawn per prompt), which are the "
                                     "trained ones: their reward differences are then caused by those steps "
                                     "alone, a much less noisy signal, and training costs n steps per image. "
                                     "-1 = the preset's (fast: 1, the papers' presets: 0)."),
            ],
            outputs=[
                io.Clip.Output(display_name="CLIP", tooltip="The input CLIP with the trained LoRA applied."),
                io.String.Output(display_name="lora_path", tooltip="The saved LoRA file."),
                io.Image.Output(display_name="reward_curve", tooltip="Mean reward per epoch with ±1 std band."),
                io.Image.Output(display_name="samples", tooltip="The last epoch's samples."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, reward, prompts: str, preset: str, epochs: int, images_per_epoch: int,
                images_per_prompt: int, batch_size: int, width: int, height: int, steps: int, guidance: float,
                eta: float, learning_rate: float, lora_rank: int, kl_weight: float, advantage: str, seed: int,
                lora_name: str, resume: bool, text_encoders: str = "all", optimizer_steps: int = 0,
                gradient_checkpointing: str = "auto", sde_steps: int = -1) -> io.NodeOutput:
        prompt_list = _prompt_list(prompts)
        if text_encoders not in ENCODER_CHOICES:
            raise ConfigError(f"text_encoders must be one of {', '.join(ENCODER_CHOICES)}, got {text_encoders!r}")
        if gradient_checkpointing not in CHECKPOINTING_CHOICES:
            raise ConfigError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING_CHOICES)}, got "
                              f"{gradient_checkpointing!r}")
        cfg = node_config(preset=preset, epochs=epochs, images_per_epoch=images_per_epoch,
                          images_per_prompt=images_per_prompt, batch_size=batch_size, width=width, height=height,
                          steps=steps, guidance=guidance, eta=eta, learning_rate=learning_rate, lora_rank=lora_rank,
                          kl_weight=kl_weight, advantage=advantage, seed=seed, optimizer_steps=optimizer_steps,
                          sde_steps=sde_steps, native_size=lambda: native_resolution(model))
        files = RunFiles(lora=save_path(lora_name, LORA_SUBFOLDER), folder=run_dir(lora_name))
        lora_path = files.lora
        if not resume and (lora_path.exists() or files.checkpoint.exists()):
            raise LoraFileError(f"A run named {lora_name!r} exists ({lora_path.name}); switch resume on to continue "
                                "it, or choose another lora_name.")
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        with torch.inference_mode(False):
            host = ComfyHost(model, clip, vae, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed,
                             encoders=ENCODER_CHOICES[text_encoders],
                             gradient_checkpointing=CHECKPOINTING_CHOICES[gradient_checkpointing])
            pbar = comfy.utils.ProgressBar(epochs)

            def on_epoch(stats) -> None:
                _send({"node": node_id, "run": lora_name, "status": "running", "epochs": epochs, **stats.as_dict()})
                pbar.update_absolute(stats.epoch, epochs)

            job = TrainingRun(host, reward, prompt_list, cfg, files, name=lora_name, resume=resume,
                              should_stop=mm.processing_interrupted, on_epoch=on_epoch)  # validates the settings
            check_memory(host, cfg)
            t0 = time.time()
            try:
                history = job.run(epochs)
            except (TrainingCancelled, mm.InterruptProcessingException):  # Cancel: polled, or raised by the progress hook
                _send({"node": node_id, "run": lora_name, "status": "cancelled", "epoch": job.epoch})
                mm.throw_exception_if_processing_interrupted()
                raise
            except BaseException as e:
                _send({"node": node_id, "run": lora_name, "status": "failed", "error": str(e)[:500],
                       "epoch": job.epoch})
                raise
            _send({"node": node_id, "run": lora_name, "status": "done", "epochs": epochs,
                   "epoch": history[-1]["epoch"] if history else 0, "seconds": time.time() - t0})
            last = job.trainer.last_images
            samples = last if last is not None else torch.zeros(1, cfg.height, cfg.width, 3)
        trained = read_lora(lora_path)
        trained.source = lora_path.name
        out_clip = clip.clone()
        out_clip.add_patches(clip_patches(match_to_clip(trained, ClipLayout.of(clip))), 1.0)
        curve = reward_curve_image([h["reward_mean"] for h in history], [h["reward_std"] for h in history],
                                   title=f"{lora_name}: {job.metadata['reward']} per epoch")
        return io.NodeOutput(out_clip, str(lora_path), curve, samples.float().cpu())
