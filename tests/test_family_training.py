"""Training on every family and every choice of text encoder, on the ComfyUI host.

SD 1.x (CLIP-L, eps), SD 2.x (OpenCLIP-H, v-prediction) and SDXL (CLIP-L + CLIP-G, pooled + size conditioning),
with SDXL trained on both encoders, CLIP-L only (te1) and CLIP-G only (te2); SD 3.x (MMDiT, rectified flow:
CLIP-L + CLIP-G + T5-XXL) and Flux (guidance-distilled flow transformer: CLIP-L + T5-XXL), each on all its
encoders and on T5 only (te3). For each: the importance ratio is
exactly 1 before the first update, gradients reach only the trained encoder's LoRA, one PPO update raises the
surrogate, and the file we write loads in ComfyUI's stock LoraLoader with the trainer's conditioning.
Models are built under inference mode, as ComfyUI's nodes run.
"""
from __future__ import annotations

import importlib
import re

import pytest
import torch
from safetensors import safe_open

from conftest import pack, tiny_models
from lora_builders import encode
from test_lora_loading import assert_same, stock_lora_loader
from test_train_comfy import PROMPTS, assert_ratio_one_and_update_raises_surrogate, brightness, randomise_lora
from test_train_comfy import small_config as comfy_small_config

ComfyHost = importlib.import_module(f"{pack.__name__}.training.hosts.comfy").ComfyHost
loop = importlib.import_module(f"{pack.__name__}.training.loop")
PROMPT = "a photo of a cat wearing a hat"

# (family, encoders to train): None trains every encoder of the CLIP
CASES = [("sd1", None), ("sd2", None), ("sdxl", None), ("sdxl", ["clip_l"]), ("sdxl", ["clip_g"]),
         ("sd3", None), ("sd3", ["t5xxl"]), ("flux", None), ("flux", ["t5xxl"])]
IDS = ["sd1", "sd2-vpred", "sdxl-both", "sdxl-te1", "sdxl-te2", "sd3-all", "sd3-te3", "flux-all", "flux-te3"]
SLOTS = {("sd1", None): {"te"}, ("sd2", None): {"te"}, ("sdxl", None): {"te1", "te2"},
         ("sdxl", ("clip_l",)): {"te1"}, ("sdxl", ("clip_g",)): {"te2"}, ("sd3", None): {"te1", "te2", "te3"},
         ("sd3", ("t5xxl",)): {"te3"}, ("flux", None): {"te1", "te3"}, ("flux", ("t5xxl",)): {"te3"}}
LAYERS = {"clip_l": 3, "clip_h": 3, "clip_g": 4, "t5xxl": 2}  # tiny_models.WIDTHS, t5_config
SLOT_ENCODER = {("sd1", "te"): "clip_l", ("sd2", "te"): "clip_h", ("sdxl", "te1"): "clip_l", ("sdxl", "te2"): "clip_g",
                ("sd3", "te1"): "clip_l", ("sd3", "te2"): "clip_g", ("sd3", "te3"): "t5xxl",
                ("flux", "te1"): "clip_l", ("flux", "te3"): "t5xxl"}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}


def kohya_modules(slot: str, encoder: str) -> list[str]:
    """The kohya module names of every attention projection of a tiny encoder (CLIP: q/k/v/out; T5: q/k/v/o)."""
    if encoder == "t5xxl":
        return [f"lora_{slot}_encoder_block_{i}_layer_0_SelfAttention_{p}"
                for i in range(LAYERS[encoder]) for p in ("q", "k", "v", "o")]
    return [f"lora_{slot}_text_model_encoder_layers_{i}_self_attn_{p}_proj"
            for i in range(LAYERS[encoder]) for p in ("q", "k", "v", "out")]


def build(family: str, encoders=None, seed: int = 0, rank: int = 4, learnable: bool = True):
    """(host, model, clip, vae) under inference mode; learnable: fan-in weights so the prompt controls the image."""
    with torch.inference_mode():
        model, clip, vae = tiny_models.tiny_checkpoint(family, 0, learnable)
        host = ComfyHost(model, clip, vae, rank=rank, alpha=float(rank), seed=seed, encoders=encoders)
    return host, model, clip, vae


def small_config(**kw):
    """test_train_comfy's settings with the whole batch in one micro-batch."""
    return comfy_small_config(**{"train_batch_size": 4, "gradient_accumulation_steps": 1, **kw})


def unused_layers(family: str) -> set[tuple[str, int]]:
    """(slot, layer) whose output ComfyUI never uses: encoders read at the penultimate layer whose pooled output
    the U-Net does not take (SD 2.x's OpenCLIP-H; SDXL's CLIP-L, whose pooled output SDXL drops). SDXL's CLIP-G
    last layer feeds only the pooled output, so its gradient proves the pooled → adm path is differentiable."""
    return {"sd2": {("te", LAYERS["clip_h"] - 1)}, "sdxl": {("te1", LAYERS["clip_l"] - 1)}}.get(family, set())


@pytest.mark.parametrize("family,encoders", CASES, ids=IDS)
def test_ratio_is_exactly_one_and_a_ppo_update_raises_the_surrogate(family, encoders):
    host, *_ = build(family, encoders)
    randomise_lora(host, std=0.05)
    tr = loop.Trainer(host, brightness, PROMPTS, small_config(lr=1e-3, clip_range=10.0))
    assert_ratio_one_and_update_raises_surrogate(host, tr)


@pytest.mark.parametrize("family,encoders", CASES, ids=IDS)
def test_gradients_reach_only_the_trained_encoders_lora(family, encoders):
    host, model, clip, vae = build(family, encoders)
    randomise_lora(host)
    assert {slot for slot, _ in host.lora.keys} == SLOTS[(family, tuple(encoders) if encoders else None)]
    tr = loop.Trainer(host, brightness, PROMPTS, small_config())
    with torch.inference_mode(False):
        traj = tr.sample(PROMPTS, seed=3)
        traj.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
        with host.training(), torch.enable_grad():
            tr.backward_microbatch(traj, torch.arange(4), torch.arange(3).repeat(4, 1), 1.0)
    dead = unused_layers(family)
    for i, (slot, path) in enumerate(host.lora.keys):
        layer = int(re.search(r"(?:layers|block)\.(\d+)\.", path).group(1))
        grads = (host.lora.down[i].grad, host.lora.up[i].grad)
        if (slot, layer) in dead:
            assert all(g is None for g in grads), f"{slot}:{path} does not reach the conditioning"
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"{slot}:{path} got no gradient"
    frozen = [*model.model.parameters(), *clip.cond_stage_model.parameters(), *vae.first_stage_model.parameters()]
    assert all(p.grad is None for p in frozen)
    # gradients stay on the LoRA: the patcher's wrappers were removed from the user's objects
    assert not model.weight_wrapper_patches and not clip.patcher.weight_wrapper_patches


@pytest.mark.parametrize("family,encoders", CASES, ids=IDS)
def test_written_file_has_kohya_keys_and_loads_in_the_stock_loader_with_identical_conditioning(
        family, encoders, loras_dir):
    host, model, clip, vae = build(family, encoders, learnable=False)
    with torch.inference_mode():
        base_cond, base_pooled = encode(clip, PROMPT)
    loop.Trainer(host, brightness, PROMPTS, small_config(epochs=1, lr=1e-2)).run(1)
    path = pack.training.lora.save_kohya(host.lora.to_lora_set("trained"), loras_dir / "trained.safetensors",
                                         family=family)
    # kohya keys as A1111/Forge read them: lora_te_/lora_te1_/lora_te2_/lora_te3_ (T5, as sd-scripts writes it for
    # SD 3.x and Flux), lora_down/lora_up + alpha, q/k/v/out (T5: q/k/v/o) for every layer of each trained encoder
    slots = SLOTS[(family, tuple(encoders) if encoders else None)]
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    expected = {f"{name}.{part}" for slot in slots for name in kohya_modules(slot, SLOT_ENCODER[(family, slot)])
                for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected
    assert meta["ss_base_model_version"] == BASE_MODEL_VERSION[family]
    # ComfyUI's stock LoraLoader reproduces the conditioning the trainer used (cross-attention and pooled)
    with torch.inference_mode(False), torch.no_grad():
        trained = host.encode([PROMPT])
    _, stock = stock_lora_loader(clip, path.name, 1.0)
    with torch.inference_mode():
        stock_cond, stock_pooled = encode(stock, PROMPT)
    assert_same((stock_cond, stock_pooled), (trained["cross_attn"], trained["pooled"]), tol=1e-5)
    # training changed exactly the trained encoder's part of the conditioning
    changed = (trained["cross_attn"] - base_cond).abs().amax(dim=(0, 1))
    if family == "sdxl" and encoders:
        l_cols = slice(0, tiny_models.WIDTHS["clip_l"][0])
        g_cols = slice(tiny_models.WIDTHS["clip_l"][0], None)
        moved, still = (l_cols, g_cols) if encoders == ["clip_l"] else (g_cols, l_cols)
        assert changed[moved].max() > 1e-4 and changed[still].max() == 0.0
        assert (encoders == ["clip_g"]) == (not torch.equal(trained["pooled"], base_pooled))
    else:
        assert changed.max() > 1e-4
