"""Model families (SD 1.x, SD 2.x, SDXL): their text encoders, and which family a LoRA is for.

ComfyUI's stock loader applies whatever keys happen to match (an SDXL file's te1 half lands on an SD 1.x
CLIP-L, the te2 half is dropped with a warning), so a LoRA of the wrong family is silently wrong. The pack
refuses it instead, with a message naming both families; this module is what names them.
"""
from __future__ import annotations

from typing import Iterable

from .types import LoraSet

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
FAMILY_LABELS = {"sd1": "SD 1.x (CLIP-L)", "sd2": "SD 2.x (OpenCLIP-H)", "sdxl": "SDXL (CLIP-L + CLIP-G)"}
ENCODER_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "clip_h": "OpenCLIP-H"}
# Hidden width of the released encoders: OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14, OpenCLIP ViT-bigG/14.
RELEASED_WIDTHS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
# The file slot (te / te1 / te2) of each encoder, per family.
FAMILY_SLOTS = {"sd1": {"clip_l": "te"}, "sd2": {"clip_h": "te"}, "sdxl": {"clip_l": "te1", "clip_g": "te2"}}


def family_of_encoders(names: Iterable[str]) -> str | None:
    """sd1 / sd2 / sdxl from the text encoders a model has; None for anything else (refiner, SD3, Flux...)."""
    s = set(names)
    if s == {"clip_l", "clip_g"}:
        return "sdxl"
    if s == {"clip_h"}:
        return "sd2"
    if s == {"clip_l"}:
        return "sd1"
    return None


def native_size(family: str | None, v_prediction: bool = False) -> int:
    """The image size a family's base models were trained at: SDXL 1024, SD 2.x v-prediction 768, else 512.

    Sampling far below it gives images the reward never sees in use; far above it costs quadratically."""
    if family == "sdxl":
        return 1024
    return 768 if family == "sd2" and v_prediction else 512


def family_label(family: str | None, fallback: str = "an unknown model family") -> str:
    return FAMILY_LABELS.get(family or "", fallback)


def encoders_label(encoders: Iterable[str]) -> str:
    """'CLIP-L + CLIP-G' for ['clip_l', 'clip_g']."""
    return " + ".join(ENCODER_LABELS.get(e, e) for e in sorted(encoders)) or "no text encoder"


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """The base model a file says it was trained on (our texforce.family, kohya's ss_*, modelspec)."""
    ours = metadata.get("texforce.family")
    if ours in FAMILIES:
        return ours
    version = (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()
    if "sdxl" in version or "stable-diffusion-xl" in version:
        return "sdxl"
    if version.startswith(("sd_v2", "stable-diffusion-v2")):
        return "sd2"
    if version.startswith(("sd_v1", "stable-diffusion-v1")):
        return "sd1"
    if not version and metadata.get("ss_v2") in ("True", "False"):  # older kohya files: SD 1.x or 2.x only
        return "sd2" if metadata["ss_v2"] == "True" else "sd1"
    return None


def _q_widths(lora: LoraSet) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for (slot, path), m in lora.modules.items():
        if path.endswith("self_attn.q_proj"):
            out.setdefault(slot, set()).add(int(m.down.shape[1]))
    return out


def lora_family(lora: LoraSet) -> str | None:
    """The family a text-encoder LoRA is for, when its keys, metadata or widths say so (None when they do not).

    te1/te2 (kohya), text_encoder_2 (diffusers) or clip_g (ComfyUI keys) mean SDXL; clip_h means SD 2.x;
    then the file's metadata; then the width of a single encoder: 1024 is OpenCLIP-H (SD 2.x), 768 is
    CLIP-L (SD 1.x). Files of other widths (and single CLIP-L files named by ComfyUI keys) stay unknown.
    """
    slots = set(lora.slots)
    if slots & {"te1", "te2", "clip_g"}:
        return "sdxl"
    if "clip_h" in slots:
        return "sd2"
    meta = family_from_metadata(lora.metadata)
    if meta:
        return meta
    widths = {w for ws in _q_widths(lora).values() for w in ws}
    kinds = {RELEASED_WIDTHS.get(w) for w in widths}
    if kinds == {"clip_h"}:
        return "sd2"
    if kinds == {"clip_l"} and slots == {"te"}:
        return "sd1"
    return None


def lora_shape(lora: LoraSet) -> str:
    """'te1 width 768, te2 width 1280': the slots of a LoRA and the width of the encoder each was made for."""
    parts = [f"{slot} width {'/'.join(map(str, sorted(ws)))}" for slot, ws in sorted(_q_widths(lora).items())]
    return ", ".join(parts) or ", ".join(lora.slots) or "no text-encoder modules"


def describe_lora(lora: LoraSet, family: str | None = None) -> str:
    """'SDXL (CLIP-L + CLIP-G): te1 width 768, te2 width 1280': the family (given, or when the file says so),
    always the slots and widths."""
    shape = lora_shape(lora)
    family = family or lora_family(lora)
    return f"{FAMILY_LABELS[family]}: {shape}" if family else f"a text encoder of another size ({shape})"


def family_mismatch(lora: LoraSet, clip_family: str | None) -> str | None:
    """'this LoRA is for SDXL (CLIP-L + CLIP-G) but the CLIP is SD 1.x (CLIP-L)', or None when nothing says so."""
    file_family = lora_family(lora)
    if file_family is None or clip_family is None or file_family == clip_family:
        return None
    return f"this LoRA is for {FAMILY_LABELS[file_family]} but the CLIP is {FAMILY_LABELS[clip_family]}"
