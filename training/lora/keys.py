"""Key grammar of every text-encoder LoRA layout, mapped onto one (slot, module path) form.

Module paths use Hugging Face CLIPTextModel naming (``text_model.encoder.layers.3.self_attn.q_proj``) and
T5EncoderModel naming (``encoder.block.3.layer.0.SelfAttention.q``), which is what ComfyUI's CLIP state dict
uses under ``clip_l.transformer.`` / ``t5xxl.transformer.`` etc. A T5 module is slot te3 whatever slot or
pipeline prefix its file gave it: Flux files say te2 (OneTrainer, early sd-scripts) or `text_encoder_2.`
(diffusers), SD 3.x files te3 / `text_encoder_3.`.
"""
from __future__ import annotations

import math
import re

import torch

from .family import ENCODERS, FILE_SLOTS, PIPELINE_PREFIXES, T5_SLOT, is_t5_path, kohya_module_to_path
from .types import LoraModule, LoraSet

# Suffix → which half of the LoRA it is. Longest first, so ".lora_A.default.weight" wins over ".weight" forms.
_SUFFIXES = [
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # diffusers' old attention-processor layout
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".alpha", "alpha"),
]

_KOHYA_TE = re.compile(rf"^lora_({'|'.join(FILE_SLOTS)})_(.+)$")
_OLD_DIFFUSERS_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def split_suffix(key: str) -> tuple[str, str] | None:
    """'x.lora_A.weight' -> ('x', 'down'); None when the key is not a LoRA tensor name."""
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _fix_old_diffusers(path: str) -> str:
    head, _, last = path.rpartition(".")
    return f"{head}.{_OLD_DIFFUSERS_ATTN[last]}" if last in _OLD_DIFFUSERS_ATTN else path


def classify(module_key: str) -> tuple[str, str, str] | None:
    """Module key -> (format, slot, module path) for text-encoder keys, None for anything else."""
    m = _KOHYA_TE.match(module_key)
    if m:
        path = kohya_module_to_path(m.group(2))
        return ("kohya", m.group(1), path) if path else None
    for prefix, slot in PIPELINE_PREFIXES:
        if module_key.startswith(prefix):
            return "diffusers", slot, _fix_old_diffusers(module_key[len(prefix):])
    if module_key.startswith("base_model.model."):
        rest = module_key[len("base_model.model."):]
        for prefix, slot in PIPELINE_PREFIXES:
            if rest.startswith(prefix):
                return "peft", slot, rest[len(prefix):]
        return "peft", "te", rest
    if module_key.startswith("text_encoders."):
        encoder, _, rest = module_key[len("text_encoders."):].partition(".")
        if encoder in ENCODERS and rest.startswith("transformer."):
            return "comfyui", encoder, rest[len("transformer."):]
    return None


def peft_scale(config: dict, module_path: str, rank: int) -> float:
    """Scale of one module from a PEFT adapter_config (lora_alpha / r, with patterns and rsLoRA)."""
    r = config.get("r", rank)
    alpha = config.get("lora_alpha", r)
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module_path):
            r = value
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module_path):
            alpha = value
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def parse_state_dict(sd: dict[str, torch.Tensor], source: str, peft_config: dict | None = None) -> LoraSet:
    """Group a flat tensor dict into LoRA modules; everything else goes to ``other``."""
    halves: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    origin: dict[tuple[str, str, str], list[str]] = {}
    for key, tensor in sd.items():
        split = split_suffix(key)
        cls = classify(split[0]) if split else None
        if cls is None:
            other[key] = tensor
            continue
        halves.setdefault(cls, {})[split[1]] = tensor
        origin.setdefault(cls, []).append(key)

    lora = LoraSet(source=source, format="")
    formats: set[str] = set()
    # a diffusers/PEFT `text_encoder.` beside a second encoder (CLIP-G, or T5) is te1, as in kohya files
    has_te2 = any(slot in ("te2", T5_SLOT) or is_t5_path(path) for _, slot, path in halves)
    for (fmt, slot, path), parts in halves.items():
        if "down" not in parts or "up" not in parts:
            # An orphan half (or a lone alpha) cannot be applied: keep it visible as unmatched.
            for key in origin[(fmt, slot, path)]:
                other[key] = sd[key]
            continue
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            for key in origin[(fmt, slot, path)]:
                other[key] = sd[key]
            lora.notes.append(f"{path}: down {tuple(down.shape)} and up {tuple(up.shape)} do not form a LoRA; skipped")
            continue
        rank = int(down.shape[0])
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().item())
        elif fmt == "peft" and peft_config is not None:
            alpha = peft_scale(peft_config, path, rank) * rank
        else:
            alpha = float(rank)  # no alpha stored: scale 1.0, as ComfyUI, kohya and A1111 do
        if slot not in ENCODERS and is_t5_path(path):
            slot = T5_SLOT
        elif fmt in ("diffusers", "peft") and slot == "te" and has_te2:
            slot = "te1"
        lora.modules[(slot, path)] = LoraModule(down=down, up=up, alpha=alpha)
        formats.add(fmt)
    lora.other = other
    lora.format = "+".join(sorted(formats)) if formats else "none"
    return lora

