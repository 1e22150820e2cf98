"""Apply a LoraSet to ComfyUI CLIP/MODEL objects through ComfyUI's own patch mechanism.

Our readers normalise every layout; ComfyUI's `comfy.lora.load_lora` then builds the weight
patches, so the arithmetic is exactly the one the stock LoraLoader uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert
import torch

from ..training.lora import LoraFileError, LoraModule, LoraSet
from ..training.lora.family import (ENCODERS, FAMILIES, comfy_encoder_module, encoders_for_slot, family_names,
                                    family_of_clip, module_path, slot_for_encoder, t5_module_path)
from ..training.lora.family_detect import describe_lora, family_mismatch, lora_family, lora_shape
from ..training.lora.keys import split_suffix


# What the slots of kohya files mean, for messages about a file that does not fit
SLOT_MEANINGS = "te1/te2 keys mean SDXL or SD 3.x, te3 keys T5-XXL of SD 3.x or Flux, a lone te SD 1.x or 2.x"


@dataclass
class ClipLayout:
    """What the text encoders of a CLIP object look like: module path -> (state-dict key, weight shape).

    `others` names text encoders the registry does not know (e.g. HiDream's llama): such a CLIP is no family
    of the pack's.
    """

    encoders: dict[str, dict[str, tuple[str, tuple[int, ...]]]]
    others: list[str] = field(default_factory=list)
    model: object = None  # the CLIP's cond_stage_model, whose class can name the family (SD 3.x without T5)

    @classmethod
    def of(cls, clip) -> "ClipLayout":
        encoders: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        others: set[str] = set()
        for key, param in clip.cond_stage_model.named_parameters():
            m = comfy_encoder_module(key)
            if m and m[1].endswith(".weight") and param.ndim == 2:
                encoders.setdefault(m[0], {})[m[1][:-len(".weight")]] = (key, tuple(param.shape))
            elif key.split(".", 1)[0] not in ENCODERS:
                others.add(key.split(".", 1)[0])
        return cls(encoders, sorted(others), clip.cond_stage_model)

    @property
    def names(self) -> list[str]:
        return sorted(self.encoders)

    @property
    def family(self) -> str | None:
        """sd1 / sd2 / sdxl / sd3 / flux, or None for any other set of text encoders (SDXL refiner, HiDream...)."""
        return None if self.others else family_of_clip(self.model, self.names)

    @property
    def label(self) -> str:
        """'SDXL (CLIP-L + CLIP-G)', or what the CLIP holds when it is no SD family."""
        family = self.family
        return FAMILIES[family].label if family else f"a CLIP with {', '.join(self.names + self.others) or 'no encoder'}"

    def describe(self) -> str:
        parts = []
        for name in self.names:
            q = self.encoders[name].get(_first_query(name))
            parts.append(f"{name} (width {q[1][1]})" if q else name)
        return ", ".join(parts) or "no text encoder"

    def candidates(self, slot: str) -> list[str]:
        """Encoders a file slot can mean on this CLIP (ComfyUI's own mapping, plus shape checks later)."""
        return encoders_for_slot(slot, self.names)


def _first_query(encoder: str) -> str:
    """The module path of the first attention query of an encoder: its input width is the encoder's width."""
    if ENCODERS[encoder].arch == "t5":
        return t5_module_path(0, "layer.0.SelfAttention.q")
    return module_path(0, "self_attn.q_proj")


@dataclass
class Resolved:
    """A LoraSet mapped onto one CLIP: per encoder modules, plus what did not fit and why."""

    modules: dict[tuple[str, str], tuple[str, LoraModule]] = field(default_factory=dict)  # (encoder, path) -> (key, m)
    unmatched: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def check_family(lora: LoraSet, layout: ClipLayout) -> None:
    """Refuse a LoRA whose keys, metadata or widths say it is for another family than this CLIP's."""
    mismatch = family_mismatch(lora, layout.family)
    if mismatch:
        raise LoraFileError(
            f"{lora.source}: {mismatch}. The file has {lora_shape(lora)}; the CLIP has {layout.describe()}. "
            f"Use it with a checkpoint of that family ({FAMILIES[lora_family(lora)].name}), or use a LoRA made for "
            f"{FAMILIES[layout.family].name}.")


def match_to_clip(lora: LoraSet, layout: ClipLayout) -> Resolved:
    """Map every text-encoder module of a file onto this CLIP, checking family and shapes; raise if nothing fits."""
    check_family(lora, layout)
    res = Resolved()
    for (slot, path), module in sorted(lora.modules.items()):
        wanted = (module.up.shape[0], module.down.shape[1])
        found = [(enc, layout.encoders[enc][path]) for enc in layout.candidates(slot) if path in layout.encoders[enc]]
        fits = [(enc, key) for enc, (key, shape) in found if shape == wanted]
        if fits:
            enc, key = fits[0]
            res.modules[(enc, path)] = (key, module)
        elif found:
            res.mismatched += [f"{slot}:{path} is {wanted[0]}×{wanted[1]}, {enc} has {shape[0]}×{shape[1]}"
                               for enc, (_, shape) in found]
        else:
            res.unmatched.append(f"{slot}:{path}")
    missing_slots = sorted({u.split(":")[0] for u in res.unmatched} - {s for s in lora.slots if layout.candidates(s)})
    if missing_slots:
        raise LoraFileError(
            f"{lora.source}: has weights for text encoder slot(s) {', '.join(missing_slots)}, which this CLIP "
            f"({layout.label}: {layout.describe()}) does not have. The LoRA is for {describe_lora(lora)}; load it "
            f"with a checkpoint of that family ({SLOT_MEANINGS})."
        )
    if lora.modules and res.mismatched:
        raise LoraFileError(
            f"{lora.source}: its text-encoder weights do not fit this CLIP ({len(res.mismatched)} module(s), e.g. "
            f"{res.mismatched[0]}). The LoRA is for {describe_lora(lora)}; this CLIP is {layout.label}: "
            f"{layout.describe()}. Use a LoRA made for this model family ({family_names()})."
        )
    if lora.modules and not res.modules:
        raise LoraFileError(
            f"{lora.source}: none of its {len(lora.modules)} text-encoder modules (slots {', '.join(lora.slots)}) "
            f"exist in this CLIP ({layout.label}: {layout.describe()}). It is probably for another model family "
            f"({SLOT_MEANINGS}); load it with a matching checkpoint."
        )
    return res


def clip_patches(res: Resolved) -> dict:
    """ComfyUI weight patches for the resolved modules, built by ComfyUI's own LoRA loader."""
    sd: dict[str, torch.Tensor] = {}
    key_map: dict[str, str] = {}
    for i, (_, (key, m)) in enumerate(sorted(res.modules.items())):
        name = f"texforce_{i}"
        sd[f"{name}.lora_down.weight"] = m.down
        sd[f"{name}.lora_up.weight"] = m.up
        sd[f"{name}.alpha"] = torch.tensor(float(m.alpha))
        key_map[name] = key
    return comfy.lora.load_lora(sd, key_map, log_missing=False)


def unet_patches(other: dict[str, torch.Tensor], model) -> tuple[dict, list[str]]:
    """Patches for the U-Net part of a file, and the keys that matched neither U-Net nor text encoder."""
    if not other:
        return {}, []
    key_map = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
    converted = comfy.lora_convert.convert_lora(dict(other))
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False) if key_map else {}
    unmatched = []
    for key in converted:
        split = split_suffix(key)
        prefix = split[0] if split else key.rsplit(".", 1)[0]
        if prefix not in key_map and key not in key_map:
            unmatched.append(key)
    return patches, unmatched


# Key prefixes of the diffusion-model part of LoRA files: kohya / sd-scripts (SD 1.x-SDXL U-Nets, and Flux and
# SD 3.x transformers as lora_unet_), diffusers (unet., transformer.), OneTrainer (lora_transformer_), ComfyUI.
UNET_PREFIXES = ("lora_unet_", "unet.", "diffusion_model.", "lycoris_", "transformer.", "lora_transformer_")


def looks_like_unet(keys: list[str]) -> bool:
    """Whether a file's unrecognised keys are a diffusion model's (U-Net or transformer) LoRA, which needs a MODEL."""
    return any(k.startswith(UNET_PREFIXES) for k in keys)


def to_file_slots(res: Resolved, layout: ClipLayout, source: str) -> LoraSet:
    """A resolved LoRA re-keyed by kohya slot (te / te1 / te2, T5 te3) of this CLIP's family, ready to write."""
    out = LoraSet(source=source, format="kohya")
    for (enc, path), (_, m) in res.modules.items():
        out.modules[(slot_for_encoder(enc, layout.names), path)] = m
    return out
