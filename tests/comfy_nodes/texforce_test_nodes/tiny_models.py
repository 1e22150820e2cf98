"""Tiny, seeded MODEL / CLIP / VAE objects built from real comfy classes (CPU, no downloads).

Key names and module structure are those of the real checkpoints (clip_l / clip_g / clip_h under
`<enc>.transformer.text_model...`, U-Nets under `diffusion_model.`), only the widths are small:
CLIP-L 32 (3 layers), CLIP-H 40 (3), CLIP-G 48 (4), so a LoRA for one encoder can never fit another by accident.
T5-XXL (SD 3.x, Flux: comfy's own SD3ClipModel / FluxClipModel with sizes overridden) has 2 blocks of 2 heads × 8;
its width is 4096 on SD 3.x, whose CLIP pads CLIP-L + CLIP-G to 4096 and joins T5's tokens to them, and 64 on
Flux (a 4096-wide T5 is a 32128 × 4096 embedding: 0.5 GB in fp32).
U-Nets per family (tiny_unet): SD 1.5 config (context 32), SD 2.x config (context 40, linear transformers,
v-prediction like 2.x-768-v), SDXL config (context 32 + 48 = 80, label embedding of CLIP-G's pooled output
plus ComfyUI's six size embeddings, i.e. 48 + 6·256 inputs), each in ComfyUI's own model class.
"""
from __future__ import annotations

import functools

import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.flux
import comfy.text_encoders.sd2_clip
import comfy.text_encoders.sd3_clip
import comfy.sdxl_clip
import comfy.supported_models


def clip_config(width: int, layers: int) -> dict:
    return {"hidden_act": "quick_gelu", "hidden_size": width, "intermediate_size": 2 * width,
            "num_attention_heads": 2, "num_hidden_layers": layers, "max_position_embeddings": 77,
            "vocab_size": 49408, "layer_norm_eps": 1e-5, "projection_dim": width,
            "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1}


WIDTHS = {"clip_l": (32, 3), "clip_h": (40, 3), "clip_g": (48, 4)}


def init_weights(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """comfy ops leave parameters uninitialised; fill them deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float32) * std).to(p.dtype))
    return module


class _Target:  # the shape of comfy.supported_models_base.ClipTarget
    def __init__(self, tokenizer, clip):
        self.tokenizer, self.clip, self.params = tokenizer, clip, {}


def _encoder(name: str, **kw):
    width, layers = WIDTHS[name]
    return functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=clip_config(width, layers),
                             model_options={"model_name": name}, **kw)


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    """comfy's SDXLClipModel (clip_l + clip_g, concatenated output, pooled from clip_g) with tiny encoders."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        torch.nn.Module.__init__(self)
        self.clip_l = _encoder("clip_l", layer="hidden", layer_idx=-2, layer_norm_hidden_state=False)(
            device=device, dtype=dtype)
        self.clip_g = _encoder("clip_g", layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                               special_tokens={"start": 49406, "end": 49407, "pad": 0})(device=device, dtype=dtype)
        self.dtypes = {dtype}


def t5_config(width: int) -> dict:
    return {"d_model": width, "d_ff": 32, "num_layers": 2, "num_heads": 2, "d_kv": 8}


T5_WIDTHS = {"sd3": 4096, "flux": 64}


def _flow_clip_options(family: str) -> dict:
    """model_options that make comfy's SD 3.x / Flux text encoders tiny (SDClipModel reads <name>_model_config)."""
    sizes = {name: {k: v for k, v in clip_config(*WIDTHS[name]).items() if k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim", "hidden_act")}
        for name in ("clip_l", "clip_g")}
    sizes["clip_g"]["hidden_act"] = "gelu"  # OpenCLIP bigG, as comfy's clip_config_bigg.json
    options = {"t5xxl_model_config": t5_config(T5_WIDTHS[family]), "clip_l_model_config": sizes["clip_l"]}
    if family == "sd3":
        options["clip_g_model_config"] = sizes["clip_g"]
    return options


def _make_clip(family: str, t5: bool = True):
    if family in ("sd3", "flux"):
        if family == "sd3":  # t5=False: an SD 3.x checkpoint without T5 (sd3_medium_incl_clips)
            return _Target(comfy.text_encoders.sd3_clip.SD3Tokenizer, comfy.text_encoders.sd3_clip.sd3_clip(t5=t5))
        return _Target(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip())
    if family == "sd1":
        return _Target(comfy.sd1_clip.SD1Tokenizer,
                       functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=_encoder("clip_l")))
    if family == "sd2":
        h = _encoder("clip_h", layer="hidden", layer_idx=-2, special_tokens={"start": 49406, "end": 49407, "pad": 0})
        return _Target(comfy.text_encoders.sd2_clip.SD2Tokenizer,
                       functools.partial(comfy.sd1_clip.SD1ClipModel, clip_name="h", clip_model=h))
    if family == "sdxl":
        return _Target(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)
    raise ValueError(f"unknown family {family!r}")


def tiny_clip(family: str = "sd1", seed: int = 0, text_controls_image: bool = False, t5: bool = True,
              t5_scaled_fp8: float | None = None) -> comfy.sd.CLIP:
    """t5_scaled_fp8: T5 stored as ComfyUI's scaled fp8 (t5xxl_fp8_e4m3fn_scaled.safetensors): e4m3 weights and one
    scale_weight per layer (this value), loaded through comfy.ops.scaled_fp8_ops."""
    options = {"dtype": torch.float32, **(_flow_clip_options(family) if family in T5_WIDTHS else {})}
    if t5_scaled_fp8 is not None:
        options["t5xxl_scaled_fp8"] = torch.float8_e4m3fn
    clip = comfy.sd.CLIP(target=_make_clip(family, t5), model_options=options)
    if text_controls_image:
        init_fan_in(clip.cond_stage_model, seed)
    else:
        init_weights(clip.cond_stage_model, seed)
    if t5_scaled_fp8 is not None:
        with torch.no_grad():
            for name, p in clip.cond_stage_model.named_parameters():
                if name.endswith("scale_weight"):
                    p.fill_(t5_scaled_fp8)
    return clip


TINY_UNET = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
             "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
             "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
             "context_dim": 32, "num_heads": 2, "num_head_channels": -1,
             "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
             "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
             "use_checkpoint": False}


def init_fan_in(module: torch.nn.Module, seed: int, cross_attn_gain: float = 10.0,
                output_gain: float = 1.0) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), biases and norms at their identity, cross-attention outputs × cross_attn_gain,
    the U-Net's last conv × output_gain.

    With N(0, 0.02) everywhere the prompt moves x0 by ~1e-8 and nothing can be learned from the text
    encoder; this initialisation makes the text pathway control the image (tests measure by how much).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                w = torch.randn(p.shape, generator=g) / fan_in**0.5
                if ".attn2.to_out." in name:
                    w = w * cross_attn_gain
                if name.startswith("diffusion_model.out.2."):
                    w = w * output_gain
                p.copy_(w.to(p.dtype))
            elif name.endswith("weight") and "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return module


def tiny_model(seed: int = 0, text_controls_image: bool = False, v_prediction: bool = False,
               output_gain: float = 1.0) -> comfy.model_patcher.ModelPatcher:
    """An SD1.5-config (eps-prediction) U-Net with context width 32, matching the tiny CLIP-L.

    text_controls_image: fan-in initialisation with strong cross-attention (see init_fan_in), for the
    learning tests and the demo; otherwise N(0, 0.02) as the reference recipe.
    """
    cfg = comfy.supported_models.SD15(dict(TINY_UNET))
    cfg.set_inference_dtype(torch.float32, None)
    if v_prediction:
        model = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.V_PREDICTION,
                                           device=torch.device("cpu"))
    else:
        model = cfg.get_model({}, device=torch.device("cpu"))
    base = init_fan_in(model, seed, output_gain=output_gain) if text_controls_image else init_weights(model, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


TINY_UNET_SD2 = {**TINY_UNET, "context_dim": 40, "use_linear_in_transformer": True}
# SDXL.encode_adm: CLIP-G's projected pooled output (width 48 here) + 6 size embeddings of width 256.
SDXL_ADM_CHANNELS = 48 + 6 * 256
TINY_UNET_SDXL = {**TINY_UNET, "context_dim": 80, "use_linear_in_transformer": True, "num_classes": "sequential",
                  "adm_in_channels": SDXL_ADM_CHANNELS, "transformer_depth": [0, 1],
                  "transformer_depth_output": [0, 0, 1, 1]}  # no attention at full resolution, like SDXL


def tiny_unet(family: str = "sd1", seed: int = 0, text_controls_image: bool = False,
              v_prediction: bool | None = None, output_gain: float = 1.0) -> comfy.model_patcher.ModelPatcher:
    """A tiny MODEL of the family in ComfyUI's own classes: sd1 = tiny_model; sd2 = SD20 config, v-prediction by
    default (as SD 2.x 768-v); sdxl = SDXL config and comfy.model_base.SDXL (pooled + size conditioning), eps."""
    if family == "sd1":
        return tiny_model(seed, text_controls_image, bool(v_prediction), output_gain)
    if family == "sd2":
        cfg = comfy.supported_models.SD20(dict(TINY_UNET_SD2))
        model_class, v_prediction = comfy.model_base.BaseModel, (True if v_prediction is None else v_prediction)
    elif family == "sdxl":
        cfg = comfy.supported_models.SDXL(dict(TINY_UNET_SDXL))
        model_class, v_prediction = comfy.model_base.SDXL, bool(v_prediction)
    else:
        raise ValueError(f"unknown family {family!r}")
    cfg.unet_config.update(num_heads=-1, num_head_channels=16)  # the real configs' 64-wide heads do not fit 32
    cfg.set_inference_dtype(torch.float32, None)
    model_type = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    model = model_class(cfg, model_type=model_type, device=torch.device("cpu"))
    base = init_fan_in(model, seed, output_gain=output_gain) if text_controls_image else init_weights(model, seed)
    if family == "sdxl" and text_controls_image:
        # The pooled output is 48 of the label embedding's 1584 inputs: ×10 on its columns, as for cross-attention,
        # so that CLIP-G's pooled output visibly steers the image.
        with torch.no_grad():
            base.diffusion_model.label_emb[0][0].weight[:, :SDXL_ADM_CHANNELS - 6 * 256] *= 10.0
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# SD 3.x: comfy's MMDiT (hidden 64·depth, depth heads), pooled = CLIP-L's (32) ‖ CLIP-G's projected (48) pooled
# outputs, context = CLIP-L ‖ CLIP-G padded to 4096 joined with T5's 4096-wide tokens; 16 × 16 patch positions
# (latents up to 32 × 32, images up to 256 px)
TINY_MMDIT = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
              "adm_in_channels": 32 + 48, "num_patches": 256, "pos_embed_max_size": 16,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                                   "out_features": 128}},
              "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}
# Flux: comfy's Flux transformer with guidance embedding; vector = CLIP-L's pooled output (32), context = T5 (64)
TINY_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
             "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
             "axes_dim": [4, 14, 14], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}


def tiny_transformer(family: str, seed: int = 0, text_controls_image: bool = False,
                     schnell: bool = False) -> comfy.model_patcher.ModelPatcher:
    """A tiny SD 3.x (MMDiT, rectified flow, shift 3) or Flux (guidance-distilled) MODEL in ComfyUI's own classes,
    sampled as their checkpoints are (comfy.supported_models.SD3 / Flux: ModelSamplingDiscreteFlow / ModelSamplingFlux).
    schnell: Flux schnell (no guidance embedding, shift 1: comfy.supported_models.FluxSchnell)."""
    if family == "sd3":
        cfg = comfy.supported_models.SD3(dict(TINY_MMDIT))
    elif family == "flux" and schnell:
        cfg = comfy.supported_models.FluxSchnell({**TINY_FLUX, "guidance_embed": False})
    elif family == "flux":
        cfg = comfy.supported_models.Flux(dict(TINY_FLUX))
    else:
        raise ValueError(f"not a transformer family: {family!r}")
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device=torch.device("cpu"))
    base = init_fan_in(model, seed) if text_controls_image else init_weights(model, seed)
    pos_embed = getattr(base.diffusion_model, "pos_embed", None)  # MMDiT's: a buffer its checkpoints hold
    if pos_embed is not None:
        with torch.no_grad():
            pos_embed.copy_(torch.randn(pos_embed.shape, generator=torch.Generator().manual_seed(seed)) * 0.02)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_checkpoint(family: str = "sd1", seed: int = 0, text_controls_image: bool = False,
                    v_prediction: bool | None = None, output_gain: float = 1.0):
    """(MODEL, CLIP, VAE) of one family, as a checkpoint loader gives them."""
    if family in T5_WIDTHS:
        return (tiny_transformer(family, seed, text_controls_image), tiny_clip(family, seed, text_controls_image),
                tiny_vae(seed, text_controls_image, latent_channels=16))
    return (tiny_unet(family, seed, text_controls_image, v_prediction, output_gain),
            tiny_clip(family, seed, text_controls_image), tiny_vae(seed, text_controls_image))


TINY_VAE = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def tiny_vae(seed: int = 0, text_controls_image: bool = False, latent_channels: int = 4) -> comfy.sd.VAE:
    """text_controls_image: fan-in initialisation, so the decoded image follows the latent (N(0, 0.02)
    weights decode every latent to flat grey). latent_channels 16: SD 3.x's and Flux's VAE layout."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    cfg = {"ddconfig": {**TINY_VAE, "z_channels": latent_channels}, "embed_dim": latent_channels}
    vae = AutoencoderKL(**cfg)
    sd = (init_fan_in(vae, seed, cross_attn_gain=1.0) if text_controls_image else init_weights(vae, seed)).state_dict()
    return comfy.sd.VAE(sd=sd, config={"params": cfg}, dtype=torch.float32)
