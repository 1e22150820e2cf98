"""The tiny test models on disk in the layouts real users have, for the headless (diffusers) host.

One set of weights, three ways in: the tiny ComfyUI model of `tiny_models` is written as an original
Stable Diffusion single-file checkpoint by ComfyUI's own `save_checkpoint`; a diffusers config folder
describing the same architecture lets diffusers' single-file loader read it; and a full diffusers folder
(`save_pretrained` of that pipeline) is the third. So the parity tests compare the two real loading paths.
SD1: write_tiny_sd1; SD 2.x and SDXL: write_tiny(root, "sd2" / "sdxl"), whose config folders are read off the
built comfy modules and laid out as diffusers' hub folders of those families are.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import comfy.model_base
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


# -- SD 2.x and SDXL ---------------------------------------------------------------------------------------

# ComfyUI's own text-encoder classes per family, and each encoder's tiny size (tiny_models.WIDTHS).
# tiny_models' CLIPs all use quick_gelu; OpenCLIP-H (SD2) and OpenCLIP-bigG (SDXL) use gelu, so these are built
# from comfy's real classes with only the sizes overridden (their config files keep the real activations).
FAMILY_ENCODERS = {"sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}
# comfy.latent_formats.SD15 / SDXL scale factors, which the diffusers VAE configs of those families carry
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def _tiny_sizes(name: str) -> dict:
    """The size fields of tiny_models.clip_config for one encoder (everything else stays as ComfyUI ships it)."""
    width, layers = tiny_models.WIDTHS[name]
    cfg = tiny_models.clip_config(width, layers)
    return {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                "projection_dim")}


def tiny_family_clip(family: str, seed: int = 0, learnable: bool = False) -> comfy.sd.CLIP:
    """A tiny CLIP of the family in ComfyUI's own classes (SD2ClipModel, SDXLClipModel) and tokenizers.

    Their layer choices (SD2: penultimate + final LN; SDXL: penultimate of both, no final LN), special tokens,
    pooled outputs and activations are ComfyUI's; only the sizes come from tiny_models.
    """
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import comfy.text_encoders.sd2_clip

    if family == "sd1":
        return tiny_models.tiny_clip("sd1", seed, learnable)
    if family == "sd2":
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd2_clip.SD2Tokenizer,
                                                        comfy.text_encoders.sd2_clip.SD2ClipModel)
    elif family == "sdxl":
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    else:
        raise ValueError(f"unknown family {family!r}")
    options = {"dtype": torch.float32, **{f"{e}_model_config": _tiny_sizes(e) for e in FAMILY_ENCODERS[family]}}
    clip = comfy.sd.CLIP(target=target, model_options=options)
    if learnable:
        tiny_models.init_fan_in(clip.cond_stage_model, seed)
    else:
        tiny_models.init_weights(clip.cond_stage_model, seed)
    return clip


def tiny_family_models(family: str, seed: int = 0, learnable: bool = False, v_prediction: bool | None = None):
    """(MODEL, CLIP, VAE) of one family, built under inference mode as ComfyUI's nodes build them.

    U-Net and VAE are tiny_models' (SD2 v-prediction by default, SDXL eps); the CLIP is tiny_family_clip.
    """
    if family == "sd1":
        return tiny_comfy_models(seed, learnable, bool(v_prediction))
    with torch.inference_mode():
        model = tiny_models.tiny_unet(family, seed, learnable, v_prediction, output_gain=20.0 if learnable else 1.0)
        return model, tiny_family_clip(family, seed, learnable), tiny_models.tiny_vae(seed, learnable)


def _heads(block) -> list[int]:
    """Heads of each transformer layer of a comfy SpatialTransformer (self- and cross-attention agree)."""
    heads = []
    for tb in block.transformer_blocks:
        assert tb.attn1.heads == tb.attn2.heads
        heads.append(tb.attn1.heads)
    return heads


def unet_config_from_comfy(model) -> dict:
    """diffusers' UNet2DConditionModel config of a built comfy U-Net, read from its modules.

    ComfyUI's family configs override the U-Net settings (SD1: 8 heads; SD2/SDXL: 64-wide heads, which
    tiny_unet sets to 16): heads, depths and attention placement are read from the comfy modules, so the
    config describes what ComfyUI actually built. diffusers' `attention_head_dim` is its legacy name for the
    number of heads per block.
    """
    from comfy.ldm.modules.attention import SpatialTransformer

    base = model.model
    uc = base.model_config.unet_config
    dm = base.diffusion_model
    mult, nrb = list(uc["channel_mult"]), list(uc["num_res_blocks"])
    levels = len(mult)
    channels = [uc["model_channels"] * m for m in mult]

    def transformer(block):
        found = [m for m in block if isinstance(m, SpatialTransformer)]
        return found[0] if found else None

    down_heads, down_depth, down_types = [], [], []
    index = 1
    for level in range(levels):
        found = [transformer(dm.input_blocks[index + j]) for j in range(nrb[level])]
        index += nrb[level] + (1 if level < levels - 1 else 0)
        if all(t is None for t in found):
            down_types.append("DownBlock2D")
            down_heads.append(channels[level] // 16)  # unused by a block without attention
            down_depth.append(1)
            continue
        assert all(t is not None for t in found), "diffusers blocks have attention after every resnet or none"
        heads = {h for t in found for h in _heads(t)}
        assert len(heads) == 1
        down_types.append("CrossAttnDownBlock2D")
        down_heads.append(heads.pop())
        down_depth.append(len(found[0].transformer_blocks))

    up_types, up_depth = [], []
    index = 0
    for level in reversed(range(levels)):
        found = [transformer(dm.output_blocks[index + j]) for j in range(nrb[level] + 1)]
        index += nrb[level] + 1
        if all(t is None for t in found):
            up_types.append("UpBlock2D")
            up_depth.append(1)
            continue
        assert all(t is not None for t in found)
        assert {h for t in found for h in _heads(t)} == {down_heads[level]}
        up_types.append("CrossAttnUpBlock2D")
        up_depth.append(len(found[0].transformer_blocks))

    mid = transformer(dm.middle_block)
    assert mid is not None and set(_heads(mid)) == {down_heads[-1]}
    config = {
        "_class_name": "UNet2DConditionModel", "sample_size": uc["image_size"], "in_channels": uc["in_channels"],
        "out_channels": uc["out_channels"], "down_block_types": down_types, "up_block_types": up_types,
        "block_out_channels": channels, "layers_per_block": nrb[0], "cross_attention_dim": uc["context_dim"],
        "attention_head_dim": down_heads, "transformer_layers_per_block": down_depth,
        "reverse_transformer_layers_per_block": up_depth if up_depth != down_depth[::-1] else None,
        "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "use_linear_projection": bool(uc["use_linear_in_transformer"]), "downsample_padding": 1, "act_fn": "silu",
        "mid_block_scale_factor": 1, "center_input_sample": False, "upcast_attention": False,
    }
    assert len(set(nrb)) == 1 and len(mid.transformer_blocks) == down_depth[-1]
    adm = uc.get("adm_in_channels")
    if adm:  # SDXL: label embedding of [pooled, 6 size embeddings of 256] (comfy.model_base.SDXL.encode_adm)
        size_dim = base.embedder.dim
        config.update(addition_embed_type="text_time", addition_time_embed_dim=size_dim,
                      projection_class_embeddings_input_dim=adm)
    return config


def _clip_text_config(comfy_encoder, with_projection: bool) -> dict:
    """transformers' CLIP text config of a built comfy encoder (its own config, as ComfyUI read it)."""
    layers = comfy_encoder.num_layers
    tm = comfy_encoder.transformer.text_model
    cfg = {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
           "model_type": "clip_text_model", "hidden_size": tm.final_layer_norm.weight.shape[0],
           "num_hidden_layers": layers, "max_position_embeddings": tm.embeddings.position_embedding.weight.shape[0],
           "vocab_size": tm.embeddings.token_embedding.weight.shape[0], "layer_norm_eps": 1e-5,
           # the ids stabilityai's SD2 / SDXL folders ship (eos 2: transformers' legacy "end token = highest id")
           "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    layer = tm.encoder.layers[0]
    cfg.update(intermediate_size=layer.mlp.fc1.weight.shape[0], num_attention_heads=layer.self_attn.heads,
               hidden_act=_activation(layer.mlp),
               projection_dim=comfy_encoder.transformer.text_projection.weight.shape[0])
    return cfg


def _activation(mlp) -> str:
    import comfy.clip_model

    for name, fn in comfy.clip_model.ACTIVATIONS.items():
        if mlp.activation is fn:
            return name
    raise ValueError(f"unknown CLIP activation {mlp.activation}")


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    """ComfyUI's CLIP tokenizer files as a diffusers tokenizer folder (77 tokens; SD2 / SDXL's second pad with "!")."""
    folder.mkdir(parents=True)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, folder / f.name)
    cfg = folder / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_max_length": 77, "pad_token": pad_token},
                              indent=2))
    special = folder / "special_tokens_map.json"
    special.write_text(json.dumps({**json.loads(special.read_text()), "pad_token": pad_token}, indent=2))


def write_family_config_folder(root: Path, family: str, model, clip) -> Path:
    """A diffusers folder without weights describing one built comfy (MODEL, CLIP), as diffusers' hub folders
    of the family are laid out: SD2 (StableDiffusionPipeline, OpenCLIP-H text encoder with the last layer
    dropped, tokenizer padding with "!"), SDXL (StableDiffusionXLPipeline, CLIP-L + CLIP-G with projection,
    tokenizer_2 padding with "!", the text_time U-Net, VAE scale 0.13025, Euler scheduler)."""
    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    v_prediction = model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    components = {"scheduler": ["diffusers", "DDIMScheduler" if family != "sdxl" else "EulerDiscreteScheduler"],
                  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    configs = {"unet": unet_config_from_comfy(model),
               "vae": {**vae_config(), "scaling_factor": VAE_SCALING[family]},
               "scheduler": {**scheduler_config(v_prediction),
                             "_class_name": components["scheduler"][1]}}
    cond = clip.cond_stage_model
    if family == "sd2":
        index = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
                 "safety_checker": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
        te = _clip_text_config(cond.clip_h, with_projection=False)
        # diffusers' SD2 text encoder ends at ComfyUI's penultimate layer: its last_hidden_state (final LN applied)
        # is the SD2 conditioning, and the single-file converter drops the checkpoint's last layer.
        te["num_hidden_layers"] -= 1
        configs["text_encoder"] = te
        _write_tokenizer(root / "tokenizer", "!")
    elif family == "sdxl":
        index = {"_class_name": "StableDiffusionXLPipeline", "feature_extractor": [None, None],
                 "image_encoder": [None, None], "force_zeros_for_empty_prompt": True,
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer_2": ["transformers", "CLIPTokenizer"]}
        configs["text_encoder"] = _clip_text_config(cond.clip_l, with_projection=False)
        configs["text_encoder_2"] = _clip_text_config(cond.clip_g, with_projection=True)
        configs["vae"]["force_upcast"] = True
        configs["scheduler"].update(interpolation_type="linear", use_karras_sigmas=False)
        for k in ("clip_sample", "set_alpha_to_one"):
            configs["scheduler"].pop(k)
        _write_tokenizer(root / "tokenizer", "<|endoftext|>")
        _write_tokenizer(root / "tokenizer_2", "!")
    else:
        raise ValueError(f"unknown family {family!r}")
    index = {"_diffusers_version": "0.30.0", **index, **components}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    for name, cfg in configs.items():
        (root / name).mkdir(exist_ok=True)
        fname = "scheduler_config.json" if name == "scheduler" else "config.json"
        (root / name / fname).write_text(json.dumps(cfg, indent=2))
    return root


def write_tiny(root: Path, family: str, seed: int = 0, learnable: bool = False,
               v_prediction: bool | None = None) -> dict:
    """One tiny model of the family as ComfyUI's single-file checkpoint plus the diffusers config folder
    describing it; returns their paths and the ComfyUI objects (model, clip, vae)."""
    if family == "sd1":
        return {**write_tiny_sd1(root, seed, learnable, bool(v_prediction)), "family": "sd1"}
    root = Path(root)
    model, clip, vae = tiny_family_models(family, seed, learnable, v_prediction)
    ckpt = write_single_file(root / f"tiny_{family}.safetensors", model, clip, vae)
    config = write_family_config_folder(root / f"tiny_{family}_config", family, model, clip)
    return {"checkpoint": ckpt, "config": config, "model": model, "clip": clip, "vae": vae, "family": family}


# -- SD 3.x and Flux ---------------------------------------------------------------------------------------

T5_TOKENIZER_DIR = Path(COMFY_DIR) / "comfy" / "text_encoders" / "t5_tokenizer"
# comfy.latent_formats.SD3 / Flux (scale, shift), which the diffusers VAE configs of those families carry
FLOW_VAE_SCALING = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
FLOW_PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def _hf_clip(comfy_encoder, with_projection: bool):
    """A transformers CLIP text model carrying the weights of one of ComfyUI's built CLIP encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = _clip_text_config(comfy_encoder, with_projection)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(CLIPTextConfig(**cfg))
    sd = {k.removeprefix("transformer."): v for k, v in comfy_encoder.state_dict().items() if k.startswith("transformer.")}
    if not with_projection:
        sd.pop("text_projection.weight")
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5's CLIPTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def _hf_t5(comfy_t5, family: str):
    """A transformers T5EncoderModel carrying the weights of ComfyUI's built T5-XXL (tiny sizes, T5 v1.1 layout)."""
    from transformers import T5Config, T5EncoderModel

    sizes = tiny_models.t5_config(tiny_models.T5_WIDTHS[family])
    sd = {k.removeprefix("transformer."): v for k, v in comfy_t5.state_dict().items() if k.startswith("transformer.")}
    cfg = T5Config(**sizes, vocab_size=sd["shared.weight"].shape[0], feed_forward_proj="gated-gelu",
                   relative_attention_num_buckets=32, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
                   use_cache=False, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    model = T5EncoderModel(cfg)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def flow_vae(family: str, comfy_vae):
    """The diffusers AutoencoderKL of tiny_models.tiny_vae(latent_channels=16), converted by diffusers' own
    single-file converter, with the family's scale and shift (tiny_models' VAE keeps quant convs, which real SD3 /
    Flux VAEs lack)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = vae_config()
    scale, shift = FLOW_VAE_SCALING[family]
    cfg.update(latent_channels=16, scaling_factor=scale, shift_factor=shift)
    cfg.pop("_class_name")
    sd = {f"first_stage_model.{k}": v.clone() for k, v in comfy_vae.first_stage_model.state_dict().items()}
    vae = AutoencoderKL(**cfg)
    missing, unexpected = vae.load_state_dict(convert_ldm_vae_checkpoint(sd, cfg), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return vae


def flow_transformer(family: str, comfy_model):
    """The diffusers SD3Transformer2DModel / FluxTransformer2DModel of tiny_models.tiny_transformer, its weights
    converted from ComfyUI's MMDiT / Flux by diffusers' own single-file converters."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    sd = {k: v.clone() for k, v in comfy_model.model.diffusion_model.state_dict().items()}
    if family == "sd3":
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        t = tiny_models.TINY_MMDIT
        ctx = t["context_embedder_config"]["params"]
        model = SD3Transformer2DModel(
            sample_size=2 * t["pos_embed_max_size"], patch_size=t["patch_size"], in_channels=t["in_channels"],
            num_layers=t["depth"], attention_head_dim=64, num_attention_heads=t["depth"],  # MMDiT: 64·depth wide
            joint_attention_dim=ctx["in_features"], caption_projection_dim=ctx["out_features"],
            pooled_projection_dim=t["adm_in_channels"], out_channels=t["out_channels"],
            pos_embed_max_size=t["pos_embed_max_size"])
        converted = convert_sd3_transformer_checkpoint_to_diffusers(sd)
    else:
        t = tiny_models.TINY_FLUX
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=t["in_channels"] * t["patch_size"] ** 2, num_layers=t["depth"],
            num_single_layers=t["depth_single_blocks"], attention_head_dim=t["hidden_size"] // t["num_heads"],
            num_attention_heads=t["num_heads"], joint_attention_dim=t["context_in_dim"],
            pooled_projection_dim=t["vec_in_dim"], guidance_embeds=t["guidance_embed"],
            axes_dims_rope=tuple(t["axes_dim"]))
        converted = _flux_converter(t["hidden_size"])(sd)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def _flux_converter(hidden: int):
    """diffusers' Flux single-file converter with its hidden width (hard-coded 3072, Flux-dev's) set to `hidden`."""
    import inspect

    import diffusers.loaders.single_file_utils as sfu

    source = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1
    namespace = dict(vars(sfu))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {hidden}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def flow_scheduler(family: str):
    """The FlowMatchEulerDiscreteScheduler configs SD3's and Flux-dev's folders ship."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def _tokenizers(root: Path, family: str) -> dict:
    """The CLIP tokenizers (ComfyUI's files, CLIP-G padding with "!") and ComfyUI's T5 tokenizer, copied into a
    scratch folder under `root` (never into the repository)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    shutil.rmtree(root, ignore_errors=True)
    _write_tokenizer(root / "clip_l", "<|endoftext|>")
    shutil.copytree(T5_TOKENIZER_DIR, root / "t5")
    out = {"tokenizer": CLIPTokenizer.from_pretrained(str(root / "clip_l"))}
    t5 = T5TokenizerFast.from_pretrained(str(root / "t5"))
    if family == "sd3":
        _write_tokenizer(root / "clip_g", "!")
        out.update(tokenizer_2=CLIPTokenizer.from_pretrained(str(root / "clip_g")), tokenizer_3=t5)
    else:
        out["tokenizer_2"] = t5
    return out


def tiny_flow_pipeline(root: Path, family: str, seed: int = 0, learnable: bool = True):
    """(diffusers pipeline, (MODEL, CLIP, VAE)) of a tiny SD 3.x or Flux model: the pipeline carries the weights of
    tiny_models.tiny_checkpoint(family) (ComfyUI's own MMDiT / Flux, SD3ClipModel / FluxClipModel and VAE)."""
    import diffusers

    with torch.inference_mode():
        model, clip, vae = tiny_models.tiny_checkpoint(family, seed, learnable)
    cond = clip.cond_stage_model
    with torch.inference_mode(False):
        encoders = {"text_encoder": _hf_clip(cond.clip_l, with_projection=family == "sd3")}
        if family == "sd3":
            encoders.update(text_encoder_2=_hf_clip(cond.clip_g, with_projection=True),
                            text_encoder_3=_hf_t5(cond.t5xxl, family))
        else:
            encoders["text_encoder_2"] = _hf_t5(cond.t5xxl, family)
        # the comfy weights are inference tensors; the pipeline's must be ordinary ones
        for te in encoders.values():
            for p in te.parameters():
                p.data = p.data.clone()
        cls = getattr(diffusers, FLOW_PIPELINES[family])
        pipe = cls(transformer=flow_transformer(family, model), scheduler=flow_scheduler(family),
                   vae=flow_vae(family, vae), **encoders, **_tokenizers(Path(root) / "tokenizers", family))
    return pipe, (model, clip, vae)


def write_tiny_flow(root: Path, family: str, seed: int = 0, learnable: bool = True) -> dict:
    """A tiny SD 3.x / Flux diffusers folder (save_pretrained of tiny_flow_pipeline) and the ComfyUI MODEL, CLIP and
    VAE whose weights it carries."""
    root = Path(root)
    pipe, (model, clip, vae) = tiny_flow_pipeline(root, family, seed, learnable)
    folder = root / f"tiny_{family}"
    pipe.save_pretrained(folder)
    return {"folder": folder, "model": model, "clip": clip, "vae": vae, "family": family}
