"""Which model family a LoRA file is for, from the registry's entries (family.py).

ComfyUI's stock loader applies whatever keys happen to match (an SDXL file's te1 half lands on an SD 1.x
CLIP-L, the te2 half is dropped with a warning), so a LoRA of the wrong family is silently wrong. The pack
refuses it instead, with a message naming both families; this module is what names them.
"""
from __future__ import annotations

from .family import FAMILIES, RELEASED_WIDTHS, listed
from .types import LoraSet


def _owners(slot: str) -> set[str]:
    """The families whose files can hold this slot: as an encoder name, a kohya slot, or a lone encoder's te."""
    return {f.id for f in FAMILIES.values()
            if slot in f.encoders or any(m.slot == slot for m in f.members) or (slot == "te" and len(f.members) == 1)}


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """The base model a file says it was trained on (our texforce.family, kohya's ss_*, modelspec)."""
    ours = metadata.get("texforce.family")
    if ours in FAMILIES:
        return ours
    version = (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()
    if version:
        return next((f.id for f in FAMILIES.values() if any(p in version for p in f.version_markers)), None)
    v2 = metadata.get("ss_v2")  # older kohya files say only whether they are for SD 2.x
    if v2 in ("True", "False"):
        return next((f.id for f in FAMILIES.values() if f.kohya_v2 is (v2 == "True")), None)
    return None


def _q_widths(lora: LoraSet) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for (slot, path), m in lora.modules.items():
        if path.endswith(("self_attn.q_proj", "SelfAttention.q")):
            out.setdefault(slot, set()).add(int(m.down.shape[1]))
    return out


def lora_families(lora: LoraSet) -> list[str]:
    """Every family whose files can hold all of this LoRA's slots (registry order): te1 + te2 fits SDXL and SD 3.x,
    te3 (T5) SD 3.x and Flux."""
    slots = set(lora.slots)
    return [f.id for f in FAMILIES.values() if slots and all(f.id in _owners(s) for s in slots)]


def lora_family(lora: LoraSet) -> str | None:
    return _identify(lora)[0]


def certain_family(lora: LoraSet) -> str | None:
    """The family when the file's slots, metadata or widths say it for certain; None when lora_family's answer is
    only the likeliest of several that fit (a te1 + te3 file: Flux's, or SD 3.x's without CLIP-G). What files
    record as their family must be this: a guess written down would refuse the file on the other families."""
    family, certain = _identify(lora)
    return family if certain else None


def _identify(lora: LoraSet) -> tuple[str | None, bool]:
    """The family a text-encoder LoRA is for, when its keys, metadata or widths say so (None when they do not).

    Slots only one family has name it (te1 + te2 + te3: SD 3.x; clip_h: SD 2.x); then the file's metadata, when
    it names a family that fits; then the width of a single encoder, when that encoder is a one-encoder family's
    and no other family's (1024: OpenCLIP-H, SD 2.x), or the file names it as a lone te (768 CLIP-L: SD 1.x);
    then the family whose encoders the file has exactly (te1 + te2: SDXL; te1 + te3: Flux); then the one
    family that fits without T5 (a te1-only or te2-only file: SDXL, whose files they usually are). Files that
    stay ambiguous (T5 alone, single CLIP-L files named by ComfyUI keys) are unknown. The flag says whether the
    answer is certain (the last two rules are likelihoods, which other families the slots fit may share).
    """
    slots = set(lora.slots)
    candidates = lora_families(lora)
    if len(candidates) == 1:
        return candidates[0], True
    meta = family_from_metadata(lora.metadata)
    if meta and (not candidates or meta in candidates):
        return meta, True
    kinds = {RELEASED_WIDTHS.get(w) for ws in _q_widths(lora).values() for w in ws}
    encoder = next(iter(kinds)) if len(kinds) == 1 else None
    for family in FAMILIES.values():
        if encoder and family.encoders == (encoder,) and (slots == {"te"} or _owners(encoder) == {family.id}):
            return family.id, True
    exact = [f for f in candidates if slots in ({m.slot for m in FAMILIES[f].members}, set(FAMILIES[f].encoders))]
    if len(exact) == 1:
        return exact[0], False
    older = [f for f in candidates if not FAMILIES[f].flow]
    return (older[0] if len(older) == 1 and slots != {"clip_l"} else None), False


def lora_shape(lora: LoraSet) -> str:
    """'te1 width 768, te2 width 1280': the slots of a LoRA and the width of the encoder each was made for."""
    parts = [f"{slot} width {'/'.join(map(str, sorted(ws)))}" for slot, ws in sorted(_q_widths(lora).items())]
    return ", ".join(parts) or ", ".join(lora.slots) or "no text-encoder modules"


def describe_lora(lora: LoraSet, family: str | None = None) -> str:
    """'SDXL (CLIP-L + CLIP-G): te1 width 768, te2 width 1280': the family (given, or when the file says so),
    always the slots and widths; 'SD 3.x or Flux: te3 width 4096' for released encoders several families share."""
    shape = lora_shape(lora)
    family = family or lora_family(lora)
    if family:
        return f"{FAMILIES[family].label}: {shape}"
    fits = lora_families(lora)
    widths = {w for ws in _q_widths(lora).values() for w in ws}
    if fits and widths and widths <= set(RELEASED_WIDTHS):  # released encoders whose slots several families share
        return f"{listed(FAMILIES[f].name for f in fits)}: {shape}"
    return f"a text encoder of another size ({shape})"


def family_mismatch(lora: LoraSet, clip_family: str | None) -> str | None:
    """'this LoRA is for SDXL (CLIP-L + CLIP-G) but the CLIP is SD 1.x (CLIP-L)', or None when nothing says so.

    A file whose slots fit several families and whose metadata names none (a te1 + te2 file: SDXL or SD 3.x,
    whose CLIP-L and CLIP-G are the same encoders) is not refused on any of them."""
    file_family, certain = _identify(lora)
    if file_family is None or clip_family is None or file_family == clip_family:
        return None
    if not certain and clip_family in lora_families(lora):
        return None
    return f"this LoRA is for {FAMILIES[file_family].label} but the CLIP is {FAMILIES[clip_family].label}"
