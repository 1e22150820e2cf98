"""The embedded toy checkpoint as ComfyUI objects: an SD 1.x-architecture MODEL / CLIP / VAE in ComfyUI's own classes.

A real latent diffusion model, only small (pretrained by scripts/build_toy_model.py on the toy world of
toy/world.py, about 4 MB in fp16): a CLIP-L-architecture text encoder 32 wide with the real SD 1.x tokenizer,
an SD 1.5-config eps-prediction U-Net on 8×8×4 latents, and an AutoencoderKL with SD's 8× downscale and
latent scale (64×64 images). Saved in the layout of an SD 1.x single-file checkpoint
(`model.diffusion_model.`, `cond_stage_model.transformer.`, `first_stage_model.`); its architecture is in the
file's metadata (`texforce.toy_config`), because ComfyUI's own checkpoint detection only knows full-size models.

This module imports ComfyUI; only nodes/ and scripts use it.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
from comfy.ldm.models.autoencoder import AutoencoderKL

WEIGHTS = Path(__file__).resolve().parent / "texforce_toy.safetensors"
NATIVE_SIZE = 64  # pixels: 8×8 latents

CONFIG: dict = {
    "clip": {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 2,
             "num_hidden_layers": 3, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
             "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1},
    "unet": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
             "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
             "transformer_depth_middle": 1, "context_dim": 32, "num_heads": 4, "num_head_channels": -1,
             "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
             "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
             "use_checkpoint": False},
    "vae": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 0, "attn_resolutions": [], "dropout": 0.0},
}
PREFIXES = {"unet": "model.", "clip": "cond_stage_model.", "vae": "first_stage_model."}


class _ClipTarget:  # the shape of comfy.supported_models_base.ClipTarget
    def __init__(self, clip_config: dict):
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer
        encoder = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=clip_config,
                                    model_options={"model_name": "clip_l"})
        self.clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=encoder)
        self.params: dict = {}


def new_unet(config: dict) -> comfy.model_base.BaseModel:
    cfg = comfy.supported_models.SD15(dict(config))
    cfg.set_inference_dtype(torch.float32, None)
    return cfg.get_model({}, device=torch.device("cpu"))


def new_clip(config: dict) -> comfy.sd.CLIP:
    return comfy.sd.CLIP(target=_ClipTarget(config), model_options={"dtype": torch.float32})


def new_autoencoder(config: dict) -> AutoencoderKL:
    return AutoencoderKL(ddconfig=dict(config), embed_dim=config["z_channels"])


def vae_object(autoencoder: AutoencoderKL, config: dict) -> comfy.sd.VAE:
    sd = {k: v.detach().float() for k, v in autoencoder.state_dict().items()}
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": dict(config), "embed_dim": config["z_channels"]}},
                        dtype=torch.float32)


def patcher(model: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def checkpoint_state(unet: torch.nn.Module, clip: comfy.sd.CLIP, autoencoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The three models' weights under an SD 1.x single-file checkpoint's key names."""
    out = {}
    for k, v in unet.state_dict().items():
        if k.startswith("diffusion_model."):
            out[PREFIXES["unet"] + k] = v
    for k, v in clip.cond_stage_model.state_dict().items():
        if k.startswith("clip_l."):
            out[PREFIXES["clip"] + k[len("clip_l."):]] = v
    for k, v in autoencoder.state_dict().items():
        out[PREFIXES["vae"] + k] = v
    return out


def _split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "clip": {}, "vae": {}}
    for key, value in state.items():
        for part, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value.float()
                break
        else:
            raise ValueError(f"unexpected key {key!r} in the toy checkpoint")
    return parts


def load_toy(path: str | os.PathLike = WEIGHTS):
    """(MODEL, CLIP, VAE) of the toy checkpoint, as a checkpoint loader gives them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the toy checkpoint {path} is missing; it ships with the pack (rebuild it with "
                                "`python scripts/build_toy_model.py`)")
    with safe_open(str(path), "pt") as f:
        config = json.loads((f.metadata() or {}).get("texforce.toy_config", "null")) or CONFIG
    parts = _split(load_file(str(path)))
    unet = new_unet(config["unet"])
    missing, unexpected = unet.load_state_dict(parts["unet"], strict=False)
    missing = [k for k in missing if k.startswith("diffusion_model.")]
    if missing or unexpected:
        raise ValueError(f"toy U-Net weights do not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    clip = new_clip(config["clip"])
    clip.cond_stage_model.load_state_dict({"clip_l." + k: v for k, v in parts["clip"].items()}, strict=True)
    autoencoder = new_autoencoder(config["vae"])
    autoencoder.load_state_dict(parts["vae"], strict=True)
    unet.model_config.texforce_native_size = NATIVE_SIZE  # what TexForce Train's auto width/height use
    return patcher(unet), clip, vae_object(autoencoder, config["vae"])
