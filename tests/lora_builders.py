"""Test helpers: random LoRAs written in each published layout by code independent of the pack's writer,
and the hand-applied reference W + s·(α/r)·B·A."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RELEASE_CONFIGS = Path(__file__).resolve().parent / "data" / "texforce_release"  # the official releases' configs
ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
PROMPT = "a photo of a cat wearing a hat"


T5_ATTN = ("q", "k", "v", "o")
CLIP_MLP = ("mlp.fc1", "mlp.fc2")
T5_MLP = ("layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo")


def _lora_target(rest: str, mlp: bool) -> bool:
    """Whether a weight (its path below `<encoder>.transformer.`) is one LoRA files train: the attention
    projections of CLIP layers and T5 blocks, and with mlp also their feed-forward layers."""
    parts = [f"self_attn.{a}" for a in ATTN] + [f"layer.0.SelfAttention.{a}" for a in T5_ATTN]
    parts += list(CLIP_MLP + T5_MLP) if mlp else []
    return any(rest.endswith(f".{part}.weight") for part in parts)


def encoder_paths(clip, mlp: bool = False) -> dict[str, list[tuple[str, tuple[int, int]]]]:
    """encoder -> [(module path, weight shape)] for q/k/v/out of every CLIP layer and q/k/v/o of every T5 block of
    that CLIP (with mlp: their feed-forward layers too)."""
    out: dict[str, list] = {}
    for key, p in clip.cond_stage_model.named_parameters():
        enc, _, rest = key.partition(".transformer.")
        if _lora_target(rest, mlp):
            out.setdefault(enc, []).append((rest[: -len(".weight")], tuple(p.shape)))
    return out


def random_lora(clip, rank: int = 4, alpha: float = 2.0, seed: int = 1, encoders=None, std: float = 0.3,
                mlp: bool = False):
    """{(encoder, path): (down, up, alpha)} with weights big enough to move the tiny model's conditioning."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for enc, paths in sorted(encoder_paths(clip, mlp).items()):
        if encoders and enc not in encoders:
            continue
        for path, (out_f, in_f) in paths:
            down = torch.randn(rank, in_f, generator=g) * std
            up = torch.randn(out_f, rank, generator=g) * std
            mods[(enc, path)] = (down, up, alpha)
    return mods


def kohya_slot(enc: str, encoders: set[str], t5_slot: str = "te3") -> str:
    """The slot kohya's sd-scripts writes: te for a lone CLIP, te1/te2 for CLIP-L/CLIP-G beside another encoder,
    T5 as t5_slot (te3 in sd-scripts' SD 3.x and Flux files, te2 in OneTrainer's and early sd-scripts' Flux files)."""
    if enc == "t5xxl":
        return t5_slot
    if len(encoders) > 1:
        return {"clip_l": "te1", "clip_g": "te2"}[enc]
    return "te"


def as_kohya(mods, t5_slot: str = "te3") -> dict[str, torch.Tensor]:
    encs = {e for e, _ in mods}
    sd = {}
    for (enc, path), (d, u, a) in mods.items():
        name = f"lora_{kohya_slot(enc, encs, t5_slot)}_{path.replace('.', '_')}"
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = d, u
        sd[f"{name}.alpha"] = torch.tensor(a)
    return sd


DIFFUSERS_SUFFIXES = {
    "lora_linear_layer": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    "lora_A": (".lora_A.weight", ".lora_B.weight"),
    "lora.down": (".lora.down.weight", ".lora.up.weight"),
}


def diffusers_prefix(enc: str, encoders: set[str], family: str | None = None) -> str:
    """The pipeline attribute diffusers names an encoder by: SDXL and SD 3.x text_encoder (CLIP-L),
    text_encoder_2 (CLIP-G), SD 3.x text_encoder_3 (T5); Flux text_encoder (CLIP-L), text_encoder_2 (T5)."""
    if enc == "t5xxl":
        return "text_encoder_2." if family == "flux" else "text_encoder_3."
    return "text_encoder_2." if (enc == "clip_g" and len(encoders) > 1) else "text_encoder."


def as_diffusers(mods, style: str, with_alpha: bool = True, family: str | None = None) -> dict[str, torch.Tensor]:
    encs = {e for e, _ in mods}
    down_s, up_s = DIFFUSERS_SUFFIXES[style]
    sd = {}
    for (enc, path), (d, u, a) in mods.items():
        prefix = diffusers_prefix(enc, encs, family)
        sd[prefix + path + down_s], sd[prefix + path + up_s] = d, u
        if with_alpha:
            sd[prefix + path + ".alpha"] = torch.tensor(a)
    return sd


def as_comfyui(mods) -> dict[str, torch.Tensor]:
    sd = {}
    for (enc, path), (d, u, a) in mods.items():
        name = f"text_encoders.{enc}.transformer.{path}"
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = d, u
        sd[f"{name}.alpha"] = torch.tensor(a)
    return sd


def write_peft_folder(folder: Path, mods, lora_alpha: float, r: int, weights: str = "adapter_model.bin",
                      config: bool = True, target_modules: list[str] | None = None) -> Path:
    """The official TexForce release layout: adapter_config.json (the real sd15 one, with r/alpha set) and
    adapter_model.bin (a torch pickle) with keys base_model.model.text_model...lora_A/B.weight and no alpha.
    One encoder per folder, as PEFT adapts one model (a T5 adapter: base_model.model.encoder.block...)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {}
    for (_, path), (d, u, _a) in mods.items():
        sd[f"base_model.model.{path}.lora_A.weight"] = d
        sd[f"base_model.model.{path}.lora_B.weight"] = u
    if weights.endswith(".bin"):
        torch.save(sd, folder / weights)
    else:
        save_file(sd, folder / weights)
    if config:
        cfg = json.loads((RELEASE_CONFIGS / "sd15_texforce" / "adapter_config.json").read_text())
        cfg.update(r=r, lora_alpha=lora_alpha, **({"target_modules": target_modules} if target_modules else {}))
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder / weights


def encode(clip, prompt: str = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return cond.float(), pooled.float()


def hand_applied(make_clip, layers: list[tuple[dict, float]]):
    """A fresh CLIP whose weights were edited by hand: W += strength · (α/r) · up @ down for each LoRA."""
    clip = make_clip()
    params = dict(clip.cond_stage_model.named_parameters())
    with torch.no_grad():
        for mods, strength in layers:
            for (enc, path), (d, u, a) in mods.items():
                params[f"{enc}.transformer.{path}.weight"] += strength * (a / d.shape[0]) * (u @ d)
    return clip
