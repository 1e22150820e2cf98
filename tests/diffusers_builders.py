"""The tiny test models on disk in the layouts real users have, for the headless (diffusers) host.

One set of weights, three ways in: the tiny ComfyUI model of `tiny_models` is written as an original
Stable Diffusion single-file checkpoint by ComfyUI's own `save_checkpoint`; a diffusers config folder
describing the same architecture lets diffusers' single-file loader read it; and a full diffusers folder
(`save_pretrained` of that pipeline) is the third. So the parity tests compare the two real loading paths.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import comfy.sd
import comfy.supported_models

from conftest import COMFY_DIR, tiny_models

TOKENIZER_DIR = Path(COMFY_DIR) / "comfy" / "sd1_tokenizer"


def unet_config(context_dim: int) -> dict:
    """tiny_models.TINY_UNET in diffusers' UNet2DConditionModel terms."""
    t = tiny_models.TINY_UNET
    blocks = [t["model_channels"] * m for m in t["channel_mult"]]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": t["image_size"], "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * len(blocks),
        "up_block_types": ["CrossAttnUpBlock2D"] * len(blocks),
        "block_out_channels": blocks, "layers_per_block": t["num_res_blocks"][0],
        # SD1's legacy name for the number of heads; ComfyUI's SD15 config sets 8 heads whatever TINY_UNET says
        "cross_attention_dim": context_dim, "attention_head_dim": comfy.supported_models.SD15.unet_extra_config["num_heads"],
        "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "use_linear_projection": t["use_linear_in_transformer"], "downsample_padding": 1, "act_fn": "silu",
        "mid_block_scale_factor": 1, "center_input_sample": False,
    }


def vae_config() -> dict:
    v = tiny_models.TINY_VAE
    blocks = [v["ch"] * m for m in v["ch_mult"]]
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": v["z_channels"],
            "down_block_types": ["DownEncoderBlock2D"] * len(blocks), "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
            "block_out_channels": blocks, "layers_per_block": v["num_res_blocks"], "norm_num_groups": 32,
            "act_fn": "silu", "sample_size": v["resolution"], "scaling_factor": 0.18215}


def scheduler_config(v_prediction: bool) -> dict:
    """Stable Diffusion's schedule (scaled_linear 0.00085 → 0.012 over 1000 steps), as its folders ship it."""
    return {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
            "prediction_type": "v_prediction" if v_prediction else "epsilon", "timestep_spacing": "leading"}


def text_encoder_config(name: str = "clip_l") -> dict:
    width, layers = tiny_models.WIDTHS[name]
    cfg = tiny_models.clip_config(width, layers)
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **cfg}


def write_config_folder(root: Path, v_prediction: bool = False) -> Path:
    """A diffusers SD1 folder without weights: what `from_single_file(config=...)` reads for the architecture."""
    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / sub).mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "safety_checker": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    (root / "unet" / "config.json").write_text(json.dumps(unet_config(tiny_models.WIDTHS["clip_l"][0]), indent=2))
    (root / "vae" / "config.json").write_text(json.dumps(vae_config(), indent=2))
    (root / "text_encoder" / "config.json").write_text(json.dumps(text_encoder_config(), indent=2))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(v_prediction), indent=2))
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, root / "tokenizer" / f.name)
    tok_cfg = root / "tokenizer" / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()), "model_max_length": 77}, indent=2))  # as SD ships
    return root


def tiny_comfy_models(seed: int = 0, learnable: bool = False, v_prediction: bool = False):
    """(model, clip, vae) of the tiny SD1 family, built under inference mode as ComfyUI's nodes build them."""
    with torch.inference_mode():
        if learnable:
            return (tiny_models.tiny_model(seed, True, v_prediction=v_prediction, output_gain=20),
                    tiny_models.tiny_clip("sd1", seed, True), tiny_models.tiny_vae(seed, True))
        return (tiny_models.tiny_model(seed, v_prediction=v_prediction), tiny_models.tiny_clip("sd1", seed),
                tiny_models.tiny_vae(seed))


def write_single_file(path: Path, model, clip, vae) -> Path:
    """The original-SD single-file layout (model.diffusion_model.*, cond_stage_model.*, first_stage_model.*)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        comfy.sd.save_checkpoint(str(path), model, clip, vae)
    return path


def write_tiny_sd1(root: Path, seed: int = 0, learnable: bool = False, v_prediction: bool = False) -> dict:
    """All three forms of one tiny SD1 model under `root`; returns their paths and the ComfyUI objects."""
    root = Path(root)
    model, clip, vae = tiny_comfy_models(seed, learnable, v_prediction)
    ckpt = write_single_file(root / "tiny_sd1.safetensors", model, clip, vae)
    config = write_config_folder(root / "tiny_sd1_config", v_prediction)
    return {"checkpoint": ckpt, "config": config, "model": model, "clip": clip, "vae": vae}
