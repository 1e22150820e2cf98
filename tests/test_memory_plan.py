"""The memory plan (training/memory_plan.py): its architecture walk, its trends, its agreement with what PyTorch
really keeps on the tiny model, and TexForce Train's refusal of a run that cannot fit.

No GPU exists on these machines: the measurements run on the CPU (what autograd saves is the same tensors on any
device), and the refusal is tested by faking a small free memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib

import pytest
import torch

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from conftest import pack, tiny_models
from test_train_comfy import build, small_config

mp = importlib.import_module(f"{pack.__name__}.training.memory_plan")
train_node = importlib.import_module(f"{pack.__name__}.nodes.train_node")
MiB = 2 ** 20

# ComfyUI's own configs (comfy/model_detection.py) of the real U-Nets
SD15 = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "image_size": 32}
SDXL = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
        "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "image_size": 32}
CLIP_L = mp.TextEncoderSpec(width=768, layers=12, heads=12, intermediate=3072)


def sd15_plan(**kw) -> "mp.MemoryPlan":
    """SD 1.5 in fp16 with PyTorch attention at 512², as ComfyUI runs it on an NVIDIA GPU."""
    base = dict(unet=mp.UNetSpec.from_config(SD15), encoders=(CLIP_L,), latent=(4, 64, 64), sample_batch=4,
                train_batch=4, guidance=True, images_per_epoch=32, steps=50, act_bytes=2,
                unet_weight_bytes=2 * 859_520_964, unet_parameters=859_520_964, clip_weight_bytes=246_000_000,
                attention="efficient", lora_parameters=1_179_648)
    return mp.plan_memory(mp.PlanInputs(**{**base, **kw}))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_walk_counts_every_parameter_of_the_tiny_unets(family):
    model = tiny_models.tiny_unet(family)
    spec = mp.UNetSpec.from_config(model.model.model_config.unet_config)
    assert mp.unet_parameters(spec) == sum(p.numel() for p in model.model.diffusion_model.parameters())


@pytest.mark.parametrize("config, count", [(SD15, 859_520_964), (SDXL, 2_567_463_684)])
def test_the_walk_counts_every_parameter_of_the_real_unets(config, count):
    """The real SD 1.5 / SDXL U-Nets, built by ComfyUI on the meta device (no memory): the same count."""
    unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    assert sum(p.numel() for p in unet.parameters()) == count == mp.unet_parameters(mp.UNetSpec.from_config(config))


def test_the_estimate_grows_with_batch_and_size_and_checkpointing_lowers_training():
    base = sd15_plan()
    bigger_batch, bigger_image = sd15_plan(train_batch=8, sample_batch=8), sd15_plan(latent=(4, 96, 96))
    assert bigger_batch.training_peak > base.training_peak and bigger_batch.sampling_peak > base.sampling_peak
    assert bigger_image.training_peak > base.training_peak and bigger_image.sampling_peak > base.sampling_peak
    # activations are linear in the batch: twice the batch, twice the U-Net activations
    assert bigger_batch.training["U-Net activations"] == pytest.approx(2 * base.training["U-Net activations"])
    checkpointed = sd15_plan(checkpointing=True)
    assert checkpointed.training["U-Net activations"] < 0.3 * base.training["U-Net activations"]
    assert checkpointed.sampling_peak == base.sampling_peak  # sampling has no backward
    # softmax maps (ComfyUI's split / sub-quadratic attention) cost more than the SDPA kernels
    assert sd15_plan(attention="quadratic").training_peak > base.training_peak
    # no guidance: one U-Net batch instead of two
    assert sd15_plan(guidance=False).training["U-Net activations"] == pytest.approx(
        base.training["U-Net activations"] / 2)


@contextlib.contextmanager
def training_pass(host, batch: int, pixels: int, time: float, guidance: float):
    """Inside the host's training set-up: a call of the diffusion model on `batch` copies of one prompt (and the
    negative) at latents of `pixels`² and model time `time`, with the conditioning requiring grad; the first call,
    which loads the model and builds the conds, is made before the caller measures."""
    with torch.inference_mode(False), host.training():
        cond = {k: v.detach().requires_grad_(True) for k, v in host.encode(["a red apple"] * batch).items()}
        uncond = {k: v.detach().requires_grad_(True) for k, v in host.encode([""]).items()}
        uncond = {k: v.expand(batch, *v.shape[1:]) for k, v in uncond.items()}
        x = torch.randn(batch, *host.latent_shape(pixels, pixels))
        t = torch.full((batch,), time)
        with host.predictor(cond, uncond, guidance) as predict:
            predict(x, t)
            yield lambda: predict(x, t)


def kept_for_backward(host, batch: int, pixels: int) -> tuple[float, float]:
    """(bytes autograd saved in one training U-Net pass through the host, the profiled peak of that forward +
    backward), on the CPU: distinct storages seen by saved_tensors_hooks, the U-Net's own weights excluded; the
    peak from torch.profiler's allocation records."""
    from torch.profiler import ProfilerActivity, profile

    weights = {p.untyped_storage().data_ptr() for p in host._model.model.parameters()}
    seen: dict[int, int] = {}

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with training_pass(host, batch, pixels, 500, 5.0) as predict:
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            predict()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            predict().square().mean().backward()
    live = peak = 0
    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return float(sum(seen.values())), float(peak)


@pytest.mark.parametrize("attention", ["quadratic", "efficient"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_matches_what_autograd_keeps_on_the_tiny_model(monkeypatch, attention, checkpointing):
    """Batch 2 (4 through the U-Net with guidance) at 256² (a 32² latent): the estimate of what a training pass
    keeps for backward is within 10% of the tensors autograd really saved, and its peak (with the gradient
    buffers of the largest backward) is at least the profiled peak and at most twice it. ComfyUI's CPU attention is
    the sub-quadratic kind; PyTorch's SDPA (what ComfyUI uses on NVIDIA GPUs) is swapped in for "efficient"."""
    if attention == "efficient":
        monkeypatch.setattr(comfy.ldm.modules.attention, "optimized_attention",
                            comfy.ldm.modules.attention.attention_pytorch)
    host, *_ = build()
    host.gradient_checkpointing = checkpointing
    batch, pixels = 2, 256
    kept, peak = kept_for_backward(host, batch, pixels)
    inputs = host.memory_inputs(small_config(sample_batch_size=batch, train_batch_size=batch, height=pixels,
                                             width=pixels))
    assert inputs.attention == attention and inputs.checkpointing is checkpointing
    layers = mp.unet_layers(inputs.unet, *inputs.latent[1:], inputs.context_tokens, inputs.act_bytes, attention)
    per_sample = mp.checkpointed_kept(layers, recompute=False) if checkpointing else mp.saved_kept(layers)
    assert 2 * batch * per_sample == pytest.approx(kept, rel=0.10), (2 * batch * per_sample / MiB, kept / MiB)
    estimate = mp.plan_memory(inputs).training["U-Net activations"]
    assert peak <= estimate <= 2 * peak, (estimate / MiB, peak / MiB)


def test_train_refuses_a_run_that_cannot_fit_and_says_what_to_lower(monkeypatch):
    """get_free_memory is faked (1 MiB; no GPU exists here): the tiny model's training pass at 256² does not fit,
    and the error gives the estimate, what is available, and the estimate of each way out."""
    host, *_ = build()
    cfg = small_config(sample_batch_size=4, train_batch_size=4, gradient_accumulation_steps=1, height=256,
                       width=256)
    train_node.check_memory(host, cfg)  # the CPU's real free RAM: fits
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda dev=None, torch_free_too=False: MiB)
    monkeypatch.setattr(comfy.model_management, "current_loaded_models", [])
    with pytest.raises(mp.MemoryPlanError) as err:
        train_node.check_memory(host, cfg)
    message = str(err.value)
    assert "does not fit in cpu RAM" in message and "0.0 GiB is available" in message
    for way in ("batch_size 4 → 2", "width/height ×3/4", "gradient_checkpointing on"):
        assert way in message, message
    assert isinstance(err.value, train_node.ConfigError)


def test_a_gpu_plan_is_refused_with_its_numbers_and_the_cpu_only_beyond_ram():
    """SD 1.5 at 512², batch 4, without checkpointing: about 8 GiB on a GPU, refused on a 6 GiB card, accepted on a
    24 GiB one; on the CPU the weights are already in RAM, so only the rest must fit."""
    plan = sd15_plan()
    assert 6 * mp.GIB < plan.peak < 12 * mp.GIB, plan.describe()
    with pytest.raises(mp.MemoryPlanError) as err:
        mp.check_fits(plan, 6 * mp.GIB, "cuda:0")
    message = str(err.value)
    assert "cuda:0 memory" in message and "6.0 GiB is available" in message and f"{plan.peak / mp.GIB:.1f} GiB" in message
    assert "gradient_checkpointing on" in message
    mp.check_fits(plan, 24 * mp.GIB, "cuda:0")
    weights = plan.training["weights"]
    mp.check_fits(plan, plan.peak - weights + 1, "cpu")
    with pytest.raises(mp.MemoryPlanError):
        mp.check_fits(plan, plan.peak - weights - mp.GIB, "cpu")
    checkpointed = sd15_plan(checkpointing=True)
    mp.check_fits(checkpointed, 6 * mp.GIB, "cuda:0")  # what the message suggests does fit


def test_a_run_that_fits_by_less_than_the_plans_known_error_is_warned_about(monkeypatch, caplog):
    """The plan has come out up to 15% under measured peaks: a run that fits by less gets a warning that says what
    to lower; one with room gets none; on the CPU the weights already in RAM do not count."""
    plan = sd15_plan()
    assert mp.close_to_limit(plan, 24 * mp.GIB, "cuda:0") is None
    message = mp.close_to_limit(plan, plan.peak / 0.9, "cuda:0")
    assert message and "close to the cuda:0 memory limit" in message and "batch size" in message
    assert mp.close_to_limit(plan, plan.peak / 0.8, "cuda:0") is None
    weights = plan.training["weights"]
    assert mp.close_to_limit(plan, (plan.peak - weights) / 0.8, "cpu") is None
    assert mp.close_to_limit(plan, (plan.peak - weights) / 0.9, "cpu")

    host, *_ = build()  # through the node: the warning goes to the log, the run is not refused
    cfg = small_config(height=64, width=64)
    need = mp.plan_memory(host.memory_inputs(cfg)).peak - mp.plan_memory(host.memory_inputs(cfg)).training["weights"]
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda dev=None, torch_free_too=False: int(need / 0.95))
    monkeypatch.setattr(comfy.model_management, "current_loaded_models", [])
    with caplog.at_level("WARNING"):
        train_node.check_memory(host, cfg)
    assert "close to the cpu memory limit" in caplog.text


def test_the_memory_available_skips_loaded_models_that_were_garbage_collected(monkeypatch):
    """ComfyUI lists a loaded model until its next clean-up even after the model is gone (its entry's model is
    None): such an entry holds nothing and must not break the check before the first epoch."""
    import gc
    import weakref

    mm = comfy.model_management
    host, *_ = build()
    with torch.inference_mode():
        other = tiny_models.tiny_model(1)
    entry = mm.LoadedModel(other)
    entry.real_model = weakref.ref(other.model)  # as model_load leaves it (ComfyUI's own clean-up reads it)
    monkeypatch.setattr(mm, "current_loaded_models", [entry])
    del other
    gc.collect()
    assert entry.model is None
    monkeypatch.setattr(mm, "current_loaded_models", [entry])  # listed until ComfyUI's next clean-up
    available, device = host.available_memory()
    assert available == float(mm.get_free_memory(torch.device(device)))


def test_gradient_checkpointing_is_an_optional_node_input_defaulting_to_auto():
    schema = train_node.TexForceTrain.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    ckpt = inputs["gradient_checkpointing"]
    assert ckpt.optional and ckpt.default == "auto" and ckpt.options == ["auto", "on", "off"]
    assert "memory" in ckpt.tooltip and "auto" in ckpt.tooltip
    assert train_node.CHECKPOINTING_CHOICES == {"auto": None, "on": True, "off": False}
