"""Half-precision models as ComfyUI loads them: the LoRA and the log-probability stay fp32.

ComfyUI keeps a U-Net in bf16/fp16 and computes in that dtype where the device supports it (`set_inference_dtype(
bf16, None)`: comfy.ops.disable_weight_init), or keeps the half weights and casts them per layer to fp32 where it
does not (`set_inference_dtype(bf16, fp32)`: comfy.ops.manual_cast, what the CPU gets). A CLIP loaded in bf16 keeps
bf16 weights and runs in fp32 through manual_cast ops. Both U-Net modes are built here on the CPU from the same
weights as the fp32 tiny model (build(learnable=True) in test_train_comfy), cast to bf16.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

from conftest import pack, tiny_models
from test_train_comfy import PROMPTS, assert_ratio_one_and_update_raises_surrogate, brightness, build, \
    randomise_lora, small_config

ComfyHost = importlib.import_module(f"{pack.__name__}.training.hosts.comfy").ComfyHost
loop = importlib.import_module(f"{pack.__name__}.training.loop")
MODES = {"bf16": None, "bf16 weights, fp32 compute": torch.float32}


def rounded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a bf16 checkpoint: every floating tensor rounded to bf16."""
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


def half_copy(model, clip, dtype: torch.dtype, compute: torch.dtype | None):
    """The fp32 tiny MODEL and CLIP as a bf16 checkpoint loaded in `dtype` (computing in `compute`, None: in
    `dtype`), as ComfyUI's loaders would (weights cast on load)."""
    with torch.inference_mode():
        cfg = comfy.supported_models.SD15(dict(tiny_models.TINY_UNET))
        cfg.set_inference_dtype(dtype, compute)
        base = comfy.model_base.BaseModel(cfg, model_type=model.model.model_type, device=torch.device("cpu"))
        base.load_state_dict(rounded(model.model.state_dict()))
        half_model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                      offload_device=mm.unet_offload_device())
        half_clip = comfy.sd.CLIP(target=tiny_models._make_clip("sd1"), model_options={"dtype": dtype})
        half_clip.cond_stage_model.load_state_dict(rounded(clip.cond_stage_model.state_dict()))
    return half_model, half_clip


def half_host(dtype: torch.dtype = torch.bfloat16, compute: torch.dtype | None = None, rank: int = 4):
    _, model, clip, vae = build(learnable=True, rank=rank)
    half_model, half_clip = half_copy(model, clip, dtype, compute)
    with torch.inference_mode():
        host = ComfyHost(half_model, half_clip, vae, rank=rank, alpha=float(rank), seed=0)
    assert next(half_model.model.diffusion_model.parameters()).dtype == dtype
    assert (half_model.model.manual_cast_dtype or dtype) == (compute or dtype)
    assert half_clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].self_attn.q_proj.weight.dtype == dtype
    return host


@pytest.mark.parametrize("mode", list(MODES))
def test_half_models_keep_the_lora_fp32_and_the_ratio_exactly_one(mode):
    """Re-scoring a sampled chain gives the stored log-probs bit for bit (ratio 1 before the first update), and
    a PPO step still raises the surrogate; the LoRA parameters are fp32 and the stored log-probs too."""
    host = half_host(torch.bfloat16, MODES[mode])
    assert all(p.dtype == torch.float32 for p in host.trainable_parameters())
    randomise_lora(host, std=0.05)
    cfg = small_config(lr=1e-3, train_batch_size=4, gradient_accumulation_steps=1, clip_range=10.0)
    tr = loop.Trainer(host, brightness, PROMPTS, cfg)
    with torch.inference_mode(False):
        traj = tr.sample(PROMPTS, seed=3)
    assert traj.log_probs.dtype == torch.float32 and traj.latents.dtype == torch.float32
    assert_ratio_one_and_update_raises_surrogate(host, tr)
    assert all(p.dtype == torch.float32 for p in host.trainable_parameters())
    # the memory plan reads the same dtypes: bf16 weights, the compute dtype, per-layer casts in manual-cast mode
    plan = host.memory_inputs(cfg)
    assert plan.act_bytes == (MODES[mode] or torch.bfloat16).itemsize and plan.weights_cast == (MODES[mode] is not None)
    assert plan.unet_weight_bytes == pytest.approx(2 * plan.unet_parameters, rel=0.01)  # + the schedule buffers


def on_policy_gradient(host, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(LoRA gradient, latents) of one micro-batch on the host's own trajectory (seed 11, the same noise for every
    host; fixed advantages, all 3 timesteps): the first pass of a PPO epoch."""
    randomise_lora(host)
    tr = loop.Trainer(host, brightness, PROMPTS, small_config(guidance=guidance))
    with torch.inference_mode(False):
        traj = tr.sample(PROMPTS, seed=11)
        traj.advantages = torch.tensor([1.0, -0.3, 0.7, -1.2])
        with host.training(), torch.enable_grad():
            tr.backward_microbatch(traj, torch.arange(4), torch.arange(3).repeat(4, 1), 1.0)
    return torch.cat([p.grad.flatten() for p in host.trainable_parameters()]), traj.latents


@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("mode", list(MODES))
def test_the_lora_gradient_of_half_models_is_close_to_fp32s(mode, guidance):
    """The same bf16 checkpoint computed in fp32 is the reference (rounding the weights makes another model, so the
    reference holds the rounded weights too). Each samples its own trajectory from the same noise and takes the
    LoRA gradient on it: in each of ComfyUI's bf16 modes it points the same way as the reference's (cosine > 0.99;
    0.998-0.999 measured with bf16 compute) with the same norm (within 5%).

    On-policy on purpose: scoring the fp32 model's trajectory with the bf16 model instead puts the bf16 error of the
    DDIM mean (a fraction of σ at the low-noise steps of this tiny model, whose output is scaled ×20) into every
    residual x_prev − mean, and the off-policy gradients then agree to a cosine of only 0.2-0.8; training never
    does that: a PPO epoch scores the chain its own model sampled, bit for bit (the test above)."""
    g32, lat32 = on_policy_gradient(half_host(torch.float32), guidance)
    g16, lat16 = on_policy_gradient(half_host(torch.bfloat16, MODES[mode]), guidance)
    assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
    assert float((lat16 - lat32).norm() / lat32.norm()) < 0.05  # the same images, up to bf16 rounding
    cosine = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    assert cosine > 0.99, cosine
    assert float(g16.norm() / g32.norm()) == pytest.approx(1.0, abs=0.05)


def test_lora_delta_on_a_half_weight_is_summed_in_fp32_and_rounded_once():
    """A small ΔW on a bf16 weight: the patched weight is fp32(W) + fp32(up@down) rounded once to bf16 (a bf16
    product then a bf16 add rounds twice and can drop an early ΔW), and the LoRA's gradient is fp32."""
    comfy_host = importlib.import_module(f"{pack.__name__}.training.hosts.comfy")
    trainable = importlib.import_module(f"{pack.__name__}.training.lora.trainable")
    lora = trainable.TrainableLora({("te1", "layer"): (64, 48)}, rank=4, alpha=4.0, seed=0)
    with torch.no_grad():
        lora.up[0].copy_(torch.randn(64, 4, generator=torch.Generator().manual_seed(1)) * 3e-3)
    w = (torch.randn(64, 48, generator=torch.Generator().manual_seed(2)) * 0.05).to(torch.bfloat16)
    out = comfy_host._LoraWrapper(lora, 0)(w)
    exact = w.float() + (lora.up[0] @ lora.down[0]) * lora.scale
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.to(torch.bfloat16))
    out.float().sum().backward()
    assert lora.up[0].grad.dtype == torch.float32 and lora.up[0].grad.abs().sum() > 0
    lora.enabled = False
    assert torch.equal(comfy_host._LoraWrapper(lora, 0)(w), w)
