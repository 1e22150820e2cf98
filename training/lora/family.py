"""The model-family registry: every family the pack knows (SD 1.x, SD 2.x, SDXL, SD 3.x, Flux) as one `Family` entry.

What a family is (its text encoders, their LoRA file slots and diffusers names, what the U-Net reads, its
native size, how files name it) is written here and nowhere else: the LoRA loader, Fuse, the converter,
both hosts and the training node read it. Adding a family is one entry in `FAMILIES` plus its tests.
Which family a LoRA file is for is worked out in family_detect.py, from these entries.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Encoder:
    """A released text encoder, as ComfyUI names it (`clip_l`: the CLIP's attribute and the
    `text_encoders.clip_l.` LoRA keys)."""

    name: str
    label: str
    width: int  # hidden width of the released encoder: what tells a lone encoder's LoRA apart
    activation: str  # hidden_act (T5: dense_act_fn) of its transformers config: tells CLIP-L from OpenCLIP-H
    pads_with_end_token: bool  # ComfyUI pads its tokens with the end token (else with id 0)
    arch: str = "clip"  # "clip" (layers named text_model.encoder.layers.N) or "t5" (encoder.block.N)


ENCODERS = {e.name: e for e in (
    Encoder("clip_l", "CLIP-L", 768, "quick_gelu", True),  # OpenAI CLIP ViT-L/14
    Encoder("clip_h", "OpenCLIP-H", 1024, "gelu", False),  # OpenCLIP ViT-H/14
    Encoder("clip_g", "CLIP-G", 1280, "gelu", False),  # OpenCLIP ViT-bigG/14
    Encoder("t5xxl", "T5-XXL", 4096, "gelu_new", False, arch="t5"),  # Google T5 v1.1 XXL, encoder only
)}


@dataclass(frozen=True)
class Member:
    """One text encoder of a family, as LoRA files and diffusers pipelines name it."""

    encoder: str
    slot: str  # kohya file slot (`lora_<slot>_` keys): te for a lone encoder, te1/te2 for two, te3 for T5
    pipeline: str  # diffusers pipeline attribute, and the `<pipeline>.` prefix of diffusers LoRA keys


@dataclass(frozen=True)
class Family:
    id: str  # what files record (texforce.family) and settings name
    name: str  # "SD 1.x"
    members: tuple[Member, ...]
    size: int  # native image size of its ε-prediction base models
    v_size: int  # native image size of its v-prediction models (SD 2.x 768-v)
    kohya_version: str  # kohya's ss_base_model_version written for it
    version_markers: tuple[str, ...]  # found in an ss_base_model_version / modelspec.architecture that names it
    comfy_config: str  # ComfyUI's supported_models class of its checkpoints (subclasses are variants)
    diffusers_pipeline: str = "StableDiffusionPipeline"  # the diffusers class that loads its single-file checkpoints
    checkpoint_prefix: str | None = None  # a key prefix only its single-file checkpoints have
    kohya_v2: bool | None = None  # kohya's ss_v2 for it; None: older kohya files never meant it
    pooled: str | None = None  # the encoder whose projected pooled output conditions the U-Net
    diffusers_truncated: bool = False  # diffusers' text encoder ends at the layer the U-Net reads
    flow: bool = False  # a rectified-flow model (velocity prediction, Flow-GRPO's SDE instead of DDIM)
    distilled_guidance: bool = False  # guidance is an input of the model (Flux), not a second, negative pass
    comfy_clip: str | None = None  # ComfyUI's text-encoder class of its checkpoints, when only this family's has it

    @property
    def encoders(self) -> tuple[str, ...]:
        return tuple(m.encoder for m in self.members)

    @property
    def label(self) -> str:
        """'SDXL (CLIP-L + CLIP-G)'."""
        return f"{self.name} ({' + '.join(ENCODERS[e].label for e in self.encoders)})"

    def slot(self, encoder: str) -> str:
        return next(m.slot for m in self.members if m.encoder == encoder)

    def native_size(self, v_prediction: bool = False) -> int:
        return self.v_size if v_prediction else self.size


FAMILIES = {f.id: f for f in (
    Family("sd1", "SD 1.x", (Member("clip_l", "te", "text_encoder"),), size=512, v_size=512,
           kohya_version="sd_v1", version_markers=("sd_v1", "stable-diffusion-v1"), comfy_config="SD15",
           kohya_v2=False),
    Family("sd2", "SD 2.x", (Member("clip_h", "te", "text_encoder"),), size=512, v_size=768,
           kohya_version="sd_v2", version_markers=("sd_v2", "stable-diffusion-v2"), comfy_config="SD20",
           kohya_v2=True, diffusers_truncated=True),
    Family("sdxl", "SDXL", (Member("clip_l", "te1", "text_encoder"), Member("clip_g", "te2", "text_encoder_2")),
           size=1024, v_size=1024, kohya_version="sdxl_base_v1-0",
           version_markers=("sdxl", "stable-diffusion-xl"), comfy_config="SDXL", pooled="clip_g",
           diffusers_pipeline="StableDiffusionXLPipeline", checkpoint_prefix="conditioner.embedders.1."),
    # SD 3.x and Flux name T5 te3 in kohya files, as kohya's sd-scripts and ComfyUI's loader do (Flux files from
    # OneTrainer and early sd-scripts say te2: keys.py reads a T5-shaped module as te3 whatever its slot says)
    Family("sd3", "SD 3.x", (Member("clip_l", "te1", "text_encoder"), Member("clip_g", "te2", "text_encoder_2"),
                             Member("t5xxl", "te3", "text_encoder_3")),
           size=1024, v_size=1024, kohya_version="sd3", version_markers=("sd3", "stable-diffusion-3"),
           comfy_config="SD3", diffusers_pipeline="StableDiffusion3Pipeline",
           checkpoint_prefix="model.diffusion_model.joint_blocks.", flow=True, comfy_clip="SD3ClipModel"),
    Family("flux", "Flux", (Member("clip_l", "te1", "text_encoder"), Member("t5xxl", "te3", "text_encoder_2")),
           size=1024, v_size=1024, kohya_version="flux1", version_markers=("flux",), comfy_config="Flux",
           diffusers_pipeline="FluxPipeline", checkpoint_prefix="model.diffusion_model.double_blocks.",
           flow=True, distilled_guidance=True, comfy_clip="FluxClipModel"),
)}

# Views of the registry, by name
ENCODER_LABELS = {e.name: e.label for e in ENCODERS.values()}
RELEASED_WIDTHS = {e.width: e.name for e in ENCODERS.values()}
FILE_SLOTS = tuple(sorted({m.slot for f in FAMILIES.values() for m in f.members}))  # te, te1, te2, te3: lora_<slot>_
T5_SLOT = "te3"  # every T5 module is te3 in the files the pack writes


def _pipeline_prefixes() -> tuple[tuple[str, str], ...]:
    """diffusers / PEFT LoRA key prefixes ('text_encoder_2.') and the slot each names in a file that has only it
    (the first family's with it; parse_state_dict makes a lone te te1 beside a te2), longest first."""
    slots: dict[str, str] = {}
    for family in FAMILIES.values():
        for m in family.members:
            slots.setdefault(f"{m.pipeline}.", m.slot)
    return tuple(sorted(slots.items(), key=lambda kv: -len(kv[0])))


PIPELINE_PREFIXES = _pipeline_prefixes()

# Text-encoder layer names. Module paths follow Hugging Face's CLIPTextModel and T5EncoderModel, which ComfyUI's
# CLIP state dict also uses under `<encoder>.transformer.`; LoRAs are trained on the attention projections.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
T5_PROJECTIONS = ("q", "k", "v", "o")
TEXT_PROJECTION = "text_projection"  # a CLIP's pooled-output projection (CLIPTextModelWithProjection's, ComfyUI's)
_ENCODER = "|".join(ENCODERS)
_LAYER = r"encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
_T5_LAYER = r"encoder\.block\.(\d+)\.(layer\.0\.SelfAttention\.[qkvo]|layer\.1\.DenseReluDense\.(?:wi_0|wi_1|wi|wo))"
_COMFY_KEY = re.compile(rf"^({_ENCODER})\.transformer\.(.+)$")
# transformers 4 names CLIP layers text_model.encoder.layers.N..., transformers 5 encoder.layers.N...
_HF_LAYER = re.compile(rf"(?:^|\.){_LAYER}$")
_T5_PATH = re.compile(rf"^{_T5_LAYER}$")
_KOHYA_LAYER = re.compile("^text_model_" + _LAYER.replace(r"\.", "_") + "$")
_KOHYA_T5_LAYER = re.compile("^" + _T5_LAYER.replace(r"\.", "_") + "$")


def module_path(layer: int, part: str) -> str:
    """The pack's module path of a layer's part: (3, 'self_attn.q_proj') -> 'text_model.encoder.layers.3.self_attn.q_proj'."""
    return f"text_model.encoder.layers.{layer}.{part}"


def t5_module_path(block: int, part: str) -> str:
    """(3, 'layer.0.SelfAttention.q') -> 'encoder.block.3.layer.0.SelfAttention.q' (T5EncoderModel's and ComfyUI's)."""
    return f"encoder.block.{block}.{part}"


def is_t5_path(path: str) -> bool:
    """Whether a module path is a T5 encoder block's (what makes a module T5's whatever slot a file gave it)."""
    return _T5_PATH.match(path) is not None


def attention_path(name: str) -> str | None:
    """The module path of an attention projection under any transformers naming of a CLIP layer or a T5 block
    (q/k/v/o of SelfAttention), else None."""
    m = _HF_LAYER.search(name)
    if m:
        return module_path(int(m.group(1)), m.group(2)) if m.group(2).startswith("self_attn.") else None
    m = re.search(rf"(?:^|\.){_T5_LAYER}$", name)
    return t5_module_path(int(m.group(1)), m.group(2)) if m and "SelfAttention" in m.group(2) else None


def comfy_encoder_module(name: str) -> tuple[str, str] | None:
    """'clip_l.transformer.text_model.x' (a ComfyUI CLIP module or tensor name) -> ('clip_l', 'text_model.x')."""
    m = _COMFY_KEY.match(name)
    return (m.group(1), m.group(2)) if m else None


def kohya_module_to_path(name: str) -> str | None:
    """'text_model_encoder_layers_3_self_attn_q_proj' -> 'text_model.encoder.layers.3.self_attn.q_proj';
    'encoder_block_3_layer_0_SelfAttention_q' -> 'encoder.block.3.layer.0.SelfAttention.q'; 'text_projection' (the
    projection of a CLIP's pooled output, which OneTrainer's SD 3.x files train) is itself."""
    if name == TEXT_PROJECTION:
        return name
    m = _KOHYA_LAYER.match(name)
    if m:
        return module_path(int(m.group(1)), m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp."))
    m = _KOHYA_T5_LAYER.match(name)
    if m:
        part = re.sub(r"^layer_(\d)_(SelfAttention|DenseReluDense)_", r"layer.\1.\2.", m.group(2))
        return t5_module_path(int(m.group(1)), part)
    return None


def path_to_kohya_module(path: str) -> str:
    return path.replace(".", "_")


# -- lookups ----------------------------------------------------------------------------------------------
def family_of_encoders(names: Iterable[str]) -> str | None:
    """The family whose text encoders are exactly these; None for anything else (an SDXL refiner, SD3 without T5...)."""
    s = set(names)
    return next((f.id for f in FAMILIES.values() if set(f.encoders) == s), None)


def family_of_comfy_config(config: object) -> str | None:
    """The family of a ComfyUI model config (its supported_models class or a subclass of it), else None."""
    names = {c.__name__ for c in type(config).__mro__}
    return next((f.id for f in FAMILIES.values() if f.comfy_config in names), None)


def family_of_clip(cond_stage_model: object, encoders: Iterable[str]) -> str | None:
    """The family of a ComfyUI CLIP's text-encoder model: its class when only one family's checkpoints have it (an
    SD 3.x checkpoint without T5 still loads an SD3ClipModel), else the family of exactly these encoders."""
    names = {c.__name__ for c in type(cond_stage_model).__mro__}
    encoders = set(encoders)
    by_class = next((f.id for f in FAMILIES.values() if f.comfy_clip in names), None)
    if by_class and encoders and encoders <= set(FAMILIES[by_class].encoders):
        return by_class
    return family_of_encoders(encoders)


def slot_for_encoder(encoder: str, encoders: Iterable[str]) -> str:
    """The kohya slot of an encoder within a model with these encoders (SDXL: te1/te2; a lone encoder: te; T5: te3)."""
    if ENCODERS[encoder].arch == "t5":
        return T5_SLOT
    family = family_of_encoders(encoders)
    return FAMILIES[family].slot(encoder) if family else "te"


def encoders_for_slot(slot: str, encoders: list[str]) -> list[str]:
    """The encoders of a model that a file slot can mean: an encoder name means itself; te / te1 the first
    encoder (a lone-encoder file's te is SDXL's CLIP-L too); te2 the family's second; te3 T5."""
    if slot == T5_SLOT:
        return [e for e in encoders if ENCODERS[e].arch == "t5"]
    if slot in ENCODERS:
        return [slot] if slot in encoders else []
    family = family_of_encoders(encoders)
    members = FAMILIES[family].members if family else [Member(e, "te", "") for e in encoders[:1]]
    if slot in ("te", "te1"):
        return [m.encoder for m in members[:1]]
    return [m.encoder for m in members if m.slot == slot]


def file_slots(slots: Iterable[str]) -> dict[str, str]:
    """slot -> kohya slot for a file's slots, with no model to say the family: the first family (in registry
    order) that has all of them (as encoder names, its kohya slots, or a lone te); unchanged when none does."""
    slots = set(slots)
    for f in FAMILIES.values():
        known = {m.encoder: m.slot for m in f.members} | {m.slot: m.slot for m in f.members}
        known.setdefault("te", f.members[0].slot)
        if slots <= set(known):
            return {s: known[s] for s in slots}
    return {s: s for s in slots}


def native_size(family: str | None, v_prediction: bool = False) -> int:
    """The image size a family's base models were trained at (512 for an unknown family).

    Sampling far below it gives images the reward never sees in use; far above it costs quadratically."""
    return FAMILIES[family].native_size(v_prediction) if family in FAMILIES else 512


def family_label(family: str | None, fallback: str = "an unknown model family") -> str:
    return FAMILIES[family].label if family in FAMILIES else fallback


def listed(words: Iterable[str], last: str = "or") -> str:
    """'a, b or c' ('a, b, c' when last is '')."""
    words = list(words)
    return f"{', '.join(words[:-1])} {last} {words[-1]}" if last and len(words) > 1 else ", ".join(words)


def family_names(last: str = "or") -> str:
    """'SD 1.x, SD 2.x, SDXL, SD 3.x or Flux': every family, for messages that say what the pack supports."""
    return listed((f.name for f in FAMILIES.values()), last)


def encoders_label(encoders: Iterable[str]) -> str:
    """'CLIP-L + CLIP-G' for ['clip_l', 'clip_g']."""
    return " + ".join(ENCODER_LABELS.get(e, e) for e in sorted(encoders)) or "no text encoder"
