"""The memory plan (training/memory_plan.py) for SD 3.x's MMDiT and Flux, and for T5-XXL LoRAs: the transformer walk
against what autograd really saves in a training pass through the ComfyUI host on the tiny models (Flux under the
host's copies of saved activations), the T5 count against an encode with gradient, the parameter counts of the
tiny and the real transformers, and the refusal of a Flux run that cannot fit.

Measured on the CPU (what autograd saves is the same tensors on any device); PyTorch's SDPA, what ComfyUI uses on
NVIDIA GPUs, is swapped in for the "efficient" runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib

import pytest
import torch

import comfy.ldm.flux.math
import comfy.ldm.modules.attention
import comfy.ldm.modules.diffusionmodules.mmdit
import comfy.model_management
import comfy.ops
from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

from conftest import pack, tiny_models
from test_flow_training import small_config
from test_memory_plan import training_pass

mp = importlib.import_module(f"{pack.__name__}.training.memory_plan")
comfy_host = importlib.import_module(f"{pack.__name__}.training.hosts.comfy")
train_node = importlib.import_module(f"{pack.__name__}.nodes.train_node")
MiB = 2 ** 20
FAMILIES = ["sd3", "flux"]

# the published architectures, as ComfyUI's model_detection reads them from the checkpoints' shapes
SD35_MEDIUM = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "input_size": None,
               "adm_in_channels": 2048, "num_patches": 147456, "pos_embed_max_size": 384, "qk_norm": "rms",
               "context_embedder_config": {"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 1536}},
               "x_block_self_attn_layers": list(range(13)), "pos_embed_scaling_factor": None}
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
T5_XXL = mp.T5EncoderSpec(width=4096, layers=24, heads=64, head_width=64, intermediate=10240, tokens=256)


@pytest.fixture(scope="module")
def checkpoints():
    with torch.inference_mode():
        return {f: tiny_models.tiny_checkpoint(f, 0, True) for f in FAMILIES}


def host_of(checkpoints, family: str, encoders=None) -> "comfy_host.ComfyHost":
    model, clip, vae = checkpoints[family]
    with torch.inference_mode():
        return comfy_host.ComfyHost(model, clip, vae, rank=4, alpha=4.0, encoders=encoders)


@pytest.fixture
def efficient(monkeypatch):
    """PyTorch's SDPA for the transformers and the text encoders, as ComfyUI picks it on NVIDIA GPUs."""
    sdpa = comfy.ldm.modules.attention.attention_pytorch
    monkeypatch.setattr(comfy.ldm.modules.attention, "optimized_attention", sdpa)
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", sdpa)
    monkeypatch.setattr(comfy.ldm.modules.diffusionmodules.mmdit, "optimized_attention", sdpa)
    monkeypatch.setattr(comfy.model_management, "pytorch_attention_enabled", lambda: True)


@contextlib.contextmanager
def recording_saved(seen: dict[int, int], exclude: set[int]):
    """Records the storage of every tensor autograd saves (by pointer: distinct storages once), `exclude` aside.
    Under the host's copies of saved activations (Flux), what its hook returns, i.e. the copies, is recorded."""
    def record(t):
        if not isinstance(t, torch.Tensor):  # the host's recipe for a weight copy (WeightCopies): nothing kept
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    original = torch.autograd.graph.saved_tensors_hooks

    def wrapped(pack_hook, unpack_hook):  # the host's own hooks (innermost) win over ours: record what they return
        return original(lambda t: record(pack_hook(t)), unpack_hook)

    torch.autograd.graph.saved_tensors_hooks = wrapped
    try:
        with original(record, lambda t: t):
            yield
    finally:
        torch.autograd.graph.saved_tensors_hooks = original


def transformer_kept(host, batch: int, pixels: int) -> float:
    """Bytes autograd saved in one training pass of the diffusion model through the host (its weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in host._model.model.parameters()}
    seen: dict[int, int] = {}
    with training_pass(host, batch, pixels, 0.5, 4.0) as predict, recording_saved(seen, weights):
        predict()
    return float(sum(seen.values()))


@pytest.mark.parametrize("attention", ["efficient", "quadratic"])
@pytest.mark.parametrize("family, checkpointing", [("sd3", False), ("sd3", True), ("flux", False)])
def test_the_transformer_estimate_matches_what_autograd_keeps(checkpoints, request, attention, family, checkpointing):
    """Batch 2 at 256² (16² patches; SD 3.x: 154 text tokens, with guidance 4 rows through the model; Flux: 256
    text tokens, one pass): the walk's estimate of what a training pass keeps is within 15% of what autograd saved,
    with SDPA and with ComfyUI's CPU default (sub-quadratic attention, softmax maps kept)."""
    if attention == "efficient":
        request.getfixturevalue("efficient")
    host = host_of(checkpoints, family)
    host.gradient_checkpointing = checkpointing
    batch = 2
    kept = transformer_kept(host, batch, 256)
    cfg = small_config(sample_batch_size=batch, train_batch_size=batch, height=256, width=256, guidance=4.0)
    inputs = host.memory_inputs(cfg)
    assert inputs.transformer is not None and inputs.unet is None and inputs.attention == attention
    assert inputs.checkpointing is checkpointing and inputs.inplace_residuals is (family == "flux")
    per_sample = inputs.kept(inputs.layers(), recompute=False)
    estimate = inputs.unet_batch(batch) * per_sample
    assert estimate == pytest.approx(kept, rel=0.15), (estimate / MiB, kept / MiB)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_inputs_of_a_transformer(checkpoints, family):
    """Text tokens (SD 3.x: CLIP's 77 joined to T5's 77; Flux: T5's 256), Flux's one pass, the pooled vector's
    gradient only when a CLIP encoder is trained, T5 counted (at its tokens) only when trained."""
    cfg = small_config(height=256, width=256, guidance=4.0)
    inputs = host_of(checkpoints, family).memory_inputs(cfg)
    assert inputs.context_tokens == (154 if family == "sd3" else 256)
    assert inputs.guidance is inputs.negative_with_grad is (family == "sd3") and inputs.vector_grad
    t5 = [e for e in inputs.encoders if isinstance(e, mp.T5EncoderSpec)]
    assert len(t5) == 1 and t5[0].tokens == (77 if family == "sd3" else 256) and t5[0].layers == 2
    only_t5 = host_of(checkpoints, family, ["t5xxl"]).memory_inputs(cfg)
    assert not only_t5.vector_grad and only_t5.encoders == tuple(t5)
    no_t5 = host_of(checkpoints, family, ["clip_l"]).memory_inputs(cfg)
    assert not any(isinstance(e, mp.T5EncoderSpec) for e in no_t5.encoders)
    assert mp.plan_memory(inputs).training["transformer activations"] > 0
    # without the pooled vector's gradient fewer tensors are kept
    assert only_t5.kept(only_t5.layers()) < inputs.kept(inputs.layers())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["quadratic", "efficient"])
def test_the_t5_estimate_matches_what_an_encode_keeps(checkpoints, monkeypatch, family, attention):
    """Two prompts encoded with gradient through the host's CLIP in training mode, the LoRA on T5 only: what
    autograd saved (the CLIP's and the LoRA's own tensors excluded) is within 15% of t5_kept. ComfyUI's T5 runs
    attention_basic on the CPU (softmax maps), SDPA where PyTorch attention is on (its mask kept)."""
    if attention == "efficient":
        monkeypatch.setattr(comfy.model_management, "pytorch_attention_enabled", lambda: True)
    host = host_of(checkpoints, family, ["t5xxl"])
    exclude = {p.untyped_storage().data_ptr() for p in [*host.clip.cond_stage_model.parameters(),
                                                        *host.lora.parameters()]}
    seen: dict[int, int] = {}
    with torch.inference_mode(False), host.training():
        host.encode(["a red apple"])
        with recording_saved(seen, exclude):
            host.encode(["a red apple", "a blue car"])
    (t5,) = comfy_host._encoder_specs(host.clip, host.encoders)
    estimate = mp.text_encoder_kept(t5, 2, 4, attention)
    assert estimate == pytest.approx(sum(seen.values()), rel=0.15), (estimate / MiB, sum(seen.values()) / MiB)


def test_a_t5_xxl_lora_costs_its_activations_not_its_weight_copies():
    """ComfyUI's ops copy every wrapped T5-XXL weight per forward (fp32: 19 GB) and each linear would keep its copy
    for backward; the host keeps recipes instead, so a prompt at Flux's 256 tokens costs its activations: ~1.5 GiB."""
    per_prompt = mp.t5_kept(T5_XXL, 1, 4, "efficient")
    assert 1 * mp.GIB < per_prompt < 2 * mp.GIB
    assert mp.t5_kept(T5_XXL, 3, 4, "efficient") == pytest.approx(3 * per_prompt)
    longer = mp.t5_kept(mp.T5EncoderSpec(**{**T5_XXL.__dict__, "tokens": 512}), 1, 4, "efficient")
    assert 1.2 * mp.GIB < longer - per_prompt < 2.5 * mp.GIB  # the activations and the bias grow with the tokens
    spec = mp.TransformerSpec.from_config(FLUX_DEV)
    inputs = mp.PlanInputs(unet=None, transformer=spec, encoders=(T5_XXL,), latent=(16, 128, 128), sample_batch=1,
                           train_batch=1, guidance=False, images_per_epoch=4, steps=20, act_bytes=2,
                           unet_weight_bytes=0, unet_parameters=0, clip_weight_bytes=0, clip_act_bytes=4, context_tokens=256,
                           inplace_residuals=True)
    assert mp.plan_memory(inputs).training["text encoders"] == pytest.approx(2 * per_prompt)
    # Flux has no negative pass: its negative prompt is encoded without gradient and keeps nothing
    flux = dataclasses.replace(inputs, negative_with_grad=False)
    assert mp.plan_memory(flux).training["text encoders"] == pytest.approx(per_prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_walk_counts_every_parameter_of_the_tiny_transformers(checkpoints, family):
    model = checkpoints[family][0]
    spec = mp.TransformerSpec.from_config(model.model.model_config.unet_config)
    assert mp.transformer_parameters(spec) == sum(p.numel() for p in model.model.diffusion_model.parameters())


def meta_parameters(config: dict) -> int:
    """The parameters of ComfyUI's own model of this config, built on the meta device (no memory)."""
    if config.get("image_model") == "flux":
        model = Flux(**config, device="meta", operations=comfy.ops.disable_weight_init)
    else:
        model = MMDiT(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [
    {**tiny_models.TINY_MMDIT, "qk_norm": "rms", "x_block_self_attn_layers": [0]},
    {**tiny_models.TINY_FLUX, "depth": 2, "depth_single_blocks": 3, "qkv_bias": False, "guidance_embed": False}])
def test_the_walk_counts_every_parameter_of_variants(config):
    """SD 3.5's qk norm and image self-attention, Flux schnell's missing guidance embedding, no qkv bias."""
    assert mp.transformer_parameters(mp.TransformerSpec.from_config(config)) == meta_parameters(config)


def test_the_walk_counts_the_parameters_of_the_real_transformers():
    """SD 3.5 Medium and Flux dev: the walk equals ComfyUI's models built on the meta device, and the published
    sizes: Flux dev 11.9B (within 1%); SD 3.5 Medium "2.5B", which counts the 384² positional embedding (a buffer
    in ComfyUI, a tensor of the checkpoint): 2.47B, 2.5B rounded (within 1.5%)."""
    sd35, flux = mp.TransformerSpec.from_config(SD35_MEDIUM), mp.TransformerSpec.from_config(FLUX_DEV)
    assert mp.transformer_parameters(sd35) == meta_parameters(SD35_MEDIUM)
    assert mp.transformer_parameters(flux) == meta_parameters(FLUX_DEV)
    assert mp.transformer_parameters(flux) == pytest.approx(11.9e9, rel=0.01)
    pos_embed = SD35_MEDIUM["num_patches"] * sd35.hidden
    assert mp.transformer_parameters(sd35) + pos_embed == pytest.approx(2.5e9, rel=0.015)
    assert (sd35.hidden, sd35.heads, len(sd35.x_self_attn_layers), sd35.qk_norm) == (1536, 24, 13, True)


def test_train_refuses_a_flux_run_that_cannot_fit_and_says_what_to_lower(checkpoints, monkeypatch):
    """get_free_memory faked to 1 MiB: the tiny Flux run at 256² does not fit; the message gives the estimate, what
    is available and the ways out, without gradient checkpointing (the host cannot checkpoint Flux's blocks)."""
    host = host_of(checkpoints, "flux")
    cfg = small_config(sample_batch_size=4, train_batch_size=4, gradient_accumulation_steps=1, height=256,
                       width=256, guidance=3.5)
    train_node.check_memory(host, cfg)  # the CPU's real free RAM: fits
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda dev=None, torch_free_too=False: MiB)
    monkeypatch.setattr(comfy.model_management, "current_loaded_models", [])
    with pytest.raises(mp.MemoryPlanError) as err:
        train_node.check_memory(host, cfg)
    message = str(err.value)
    assert "does not fit in cpu RAM" in message and "0.0 GiB is available" in message
    assert "batch_size 4 → 2" in message and "width/height ×3/4" in message, message
    assert "gradient_checkpointing" not in message
    assert isinstance(err.value, train_node.ConfigError)


def test_a_flux_dev_plan_at_1024_and_what_a_t5_lora_adds():
    """Flux dev in bf16 at 1024², batch 1, CLIP-L LoRA: without checkpointing (the host cannot checkpoint Flux) its
    57 blocks over 4096 image + 256 text tokens keep about 20 GiB, which with the weights fits an 80 GiB card and
    not a 48 GiB one; a T5 LoRA adds about 1.5 GiB for the prompt (the negative, without gradient, keeps nothing)."""
    spec = mp.TransformerSpec.from_config(FLUX_DEV)
    clip_l = mp.TextEncoderSpec(width=768, layers=12, heads=12, intermediate=3072)
    base = dict(unet=None, transformer=spec, latent=(16, 128, 128), sample_batch=1, train_batch=1, guidance=False,
                images_per_epoch=8, steps=20, act_bytes=2, unet_weight_bytes=2 * 11_901_408_320,
                unet_parameters=11_901_408_320, clip_weight_bytes=2 * 4_900_000_000, clip_act_bytes=4, context_tokens=256,
                lora_parameters=1_179_648, inplace_residuals=True)
    clip_only = mp.plan_memory(mp.PlanInputs(encoders=(clip_l,), **base))
    activations = clip_only.training["transformer activations"]
    assert 15 * mp.GIB < activations < 25 * mp.GIB, clip_only.describe()
    mp.check_fits(clip_only, 80 * mp.GIB, "cuda:0")
    with pytest.raises(mp.MemoryPlanError):
        mp.check_fits(clip_only, 48 * mp.GIB, "cuda:0")
    with_t5 = mp.plan_memory(mp.PlanInputs(encoders=(clip_l, T5_XXL), negative_with_grad=False, **base))
    assert 1 * mp.GIB < with_t5.training["text encoders"] < 2.5 * mp.GIB
    assert with_t5.training_peak > clip_only.training_peak + 1 * mp.GIB
    mp.check_fits(with_t5, 80 * mp.GIB, "cuda:0")
    with pytest.raises(mp.MemoryPlanError, match="cuda:0 memory"):
        mp.check_fits(with_t5, 48 * mp.GIB, "cuda:0")
