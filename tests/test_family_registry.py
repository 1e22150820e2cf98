"""The model-family registry: each entry is consistent, and every lookup the loader, writer, converter and hosts use
finds it. The checks run over all entries, so a new family is checked by adding it."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import pack

family = importlib.import_module(f"{pack.__name__}.training.lora.family")
detect = importlib.import_module(f"{pack.__name__}.training.lora.family_detect")
write = importlib.import_module(f"{pack.__name__}.training.lora.write")
keys = importlib.import_module(f"{pack.__name__}.training.lora.keys")
LoraSet, LoraModule = pack.training.lora.LoraSet, pack.training.lora.LoraModule
ENTRIES = list(family.FAMILIES.values())


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.id)
def test_an_entry_is_consistent(entry):
    assert entry.members and all(m.encoder in family.ENCODERS for m in entry.members)
    for field in ("encoder", "slot", "pipeline"):
        assert len({getattr(m, field) for m in entry.members}) == len(entry.members), field
    assert all(m.slot in family.FILE_SLOTS for m in entry.members)
    assert entry.pooled is None or entry.pooled in entry.encoders
    assert family.family_of_encoders(reversed(entry.encoders)) == entry.id
    others = [f for f in ENTRIES if f is not entry]
    assert all(set(f.encoders) != set(entry.encoders) for f in others)  # the encoders name the family


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.id)
def test_slots_round_trip(entry):
    """An encoder's kohya slot maps back to it on a model of the family, and a file keyed by encoder names is
    re-keyed to the family's kohya slots (the converter's rule)."""
    encoders = list(entry.encoders)
    for m in entry.members:
        assert family.slot_for_encoder(m.encoder, encoders) == m.slot
        assert family.encoders_for_slot(m.slot, encoders) == [m.encoder]
        assert family.encoders_for_slot(m.encoder, encoders) == [m.encoder]
    assert family.file_slots(encoders) == {m.encoder: m.slot for m in entry.members}
    assert family.file_slots([m.slot for m in entry.members]) == {m.slot: m.slot for m in entry.members}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.id)
def test_written_metadata_names_the_family(entry):
    meta = write.kohya_metadata(LoraSet(source="x", format="kohya"), entry.id)
    assert meta["ss_base_model_version"] == entry.kohya_version
    assert detect.family_from_metadata({k: v for k, v in meta.items() if k != "texforce.family"}) == entry.id
    assert detect.family_from_metadata(meta) == entry.id


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.id)
def test_a_lora_of_every_encoder_is_recognised_by_its_keys(entry):
    """A file with the family's kohya keys for all its encoders, without metadata, is this family's: by a slot no
    other family has, or (one-encoder families sharing 'te') by the width of the released encoder."""
    lora = LoraSet(source="x", format="kohya")
    for m in entry.members:
        width = family.ENCODERS[m.encoder].width
        lora.modules[(m.slot, query_path(m.encoder))] = LoraModule(
            down=torch.zeros(2, width), up=torch.zeros(width, 2), alpha=2.0)
    assert detect.lora_family(lora) == entry.id
    parsed = keys.parse_state_dict(write.kohya_state_dict(lora), source="x")
    assert set(parsed.modules) == set(lora.modules)


def query_path(encoder: str, layer: int = 0) -> str:
    if family.ENCODERS[encoder].arch == "t5":
        return family.t5_module_path(layer, "layer.0.SelfAttention.q")
    return family.module_path(layer, "self_attn.q_proj")


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.id)
def test_comfy_config_class_and_its_subclasses_name_the_family(entry):
    config = type(entry.comfy_config, (), {})
    variant = type("Variant", (config,), {})
    assert family.family_of_comfy_config(config()) == entry.id
    assert family.family_of_comfy_config(variant()) == entry.id
    assert family.native_size(entry.id) == entry.size and family.native_size(entry.id, True) == entry.v_size


def test_layer_names_in_every_naming():
    path = "text_model.encoder.layers.3.self_attn.q_proj"
    assert family.module_path(3, "self_attn.q_proj") == path
    assert family.attention_path("encoder.layers.3.self_attn.q_proj") == path  # transformers 5
    assert family.attention_path(path) == path  # transformers 4
    assert family.attention_path("text_model.encoder.layers.3.mlp.fc1") is None
    assert family.kohya_module_to_path(family.path_to_kohya_module(path)) == path
    assert family.kohya_module_to_path("text_model_encoder_layers_3_mlp_fc2") == "text_model.encoder.layers.3.mlp.fc2"
    assert family.comfy_encoder_module(f"clip_g.transformer.{path}") == ("clip_g", path)
    assert family.comfy_encoder_module(f"clip_x.transformer.{path}") is None
    assert not family.is_t5_path(path)


def test_t5_layer_names_in_every_naming():
    """T5EncoderModel's and ComfyUI's T5 names (the same), kohya's underscored form, and what is not a LoRA target."""
    q = "encoder.block.5.layer.0.SelfAttention.q"
    assert family.t5_module_path(5, "layer.0.SelfAttention.q") == q and family.is_t5_path(q)
    assert family.attention_path(q) == q and family.attention_path(f"text_encoder_3.{q}") == q
    assert family.attention_path("encoder.block.5.layer.1.DenseReluDense.wi_0") is None
    for part in ("layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo"):
        path = family.t5_module_path(5, part)
        assert family.kohya_module_to_path(family.path_to_kohya_module(path)) == path
    assert family.kohya_module_to_path("encoder_block_5_layer_0_SelfAttention_q") == q
    assert family.kohya_module_to_path("encoder_block_5_layer_0_SelfAttention_x") is None
    assert family.comfy_encoder_module(f"t5xxl.transformer.{q}") == ("t5xxl", q)
    assert not family.is_t5_path("encoder.block.5.layer.0.SelfAttention.relative_attention_bias")


@pytest.mark.parametrize("slot,prefix", [("te3", "lora_te3_"), ("te2", "lora_te2_"), ("diffusers", "text_encoder_2."),
                                         ("diffusers", "text_encoder_3."), ("peft", "base_model.model.")])
def test_a_t5_module_is_te3_whatever_its_file_calls_it(slot, prefix):
    """sd-scripts and ComfyUI say te3 for T5 (SD 3.x and Flux); OneTrainer's and early sd-scripts' Flux files say te2,
    diffusers' Flux pipeline text_encoder_2: a T5-shaped module is te3 in every case, and CLIP-L beside it te1."""
    q = family.t5_module_path(0, "layer.0.SelfAttention.q")
    t5_key = prefix + (family.path_to_kohya_module(q) if prefix.startswith("lora_") else q)
    clip_q = family.module_path(0, "self_attn.q_proj")
    clip_key = "lora_te1_" + family.path_to_kohya_module(clip_q) if prefix.startswith("lora_") else f"text_encoder.{clip_q}"
    if prefix.startswith("base_model"):
        clip_key = None
    sd = {}
    for key, width in ((t5_key, 4096), (clip_key, 768)):
        if key is None:
            continue
        sep = "." if prefix.startswith("lora_") else "."
        down, up = ("lora_down", "lora_up") if prefix.startswith("lora_") else ("lora_A", "lora_B")
        sd[f"{key}{sep}{down}.weight"] = torch.zeros(2, width)
        sd[f"{key}{sep}{up}.weight"] = torch.zeros(width, 2)
    lora = keys.parse_state_dict(sd, source="x")
    assert ("te3", q) in lora.modules and not lora.other
    if clip_key is not None:
        assert ("te1", clip_q) in lora.modules
        assert detect.lora_family(lora) == "flux"  # CLIP-L + T5 exactly
    else:
        assert detect.lora_family(lora) is None  # T5 alone: SD 3.x or Flux
        assert detect.lora_families(lora) == ["sd3", "flux"]


def test_a_clip_only_file_fits_sdxl_and_sd3_and_is_refused_on_neither():
    """SD 3.x has SDXL's CLIP-L and CLIP-G: a te1 + te2 file without metadata is reported as SDXL's (what such files
    usually are) but applies to an SD 3.x CLIP too; with SD 3.x metadata it is SD 3.x's and refused on SDXL."""
    lora = LoraSet(source="x", format="kohya")
    for slot, width in (("te1", 768), ("te2", 1280)):
        lora.modules[(slot, family.module_path(0, "self_attn.q_proj"))] = LoraModule(
            down=torch.zeros(2, width), up=torch.zeros(width, 2), alpha=2.0)
    assert detect.lora_family(lora) == "sdxl" and detect.lora_families(lora) == ["sdxl", "sd3"]
    assert detect.family_mismatch(lora, "sd3") is None and detect.family_mismatch(lora, "sdxl") is None
    assert "SD 1.x" in detect.family_mismatch(lora, "sd1")
    lora.metadata = {"ss_base_model_version": "sd3"}
    assert detect.lora_family(lora) == "sd3"
    assert "but the CLIP is SDXL" in detect.family_mismatch(lora, "sdxl")


def test_lookups_outside_the_registry():
    assert family.family_of_encoders(["clip_g"]) is None  # the SDXL refiner
    assert family.slot_for_encoder("clip_g", ["clip_g"]) == "te"
    assert family.native_size(None) == 512
    assert family.family_of_comfy_config(object()) is None
    assert family.family_label(None) == "an unknown model family"
    assert family.family_names() == ", ".join(f.name for f in ENTRIES[:-1]) + f" or {ENTRIES[-1].name}"
