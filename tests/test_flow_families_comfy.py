"""SD 3.x and Flux on the ComfyUI host: the tiny MODEL / CLIP / VAE of each in ComfyUI's own classes (MMDiT with
CLIP-L + CLIP-G + T5-XXL; the Flux transformer with CLIP-L + T5-XXL and its guidance embedding), trained with
Flow-GRPO's SDE on the times of ComfyUI's scheduler.

What is checked here beyond tests/test_family_training.py (ratio 1, PPO, gradients per encoder, stock-loader
parity): without noise the chain is ComfyUI's own Euler sampler (SD 3.x with CFG; Flux with its distilled guidance
as the FluxGuidance node sets it and no negative pass); the gradient through a T5 LoRA and Flux's transformer matches
finite differences (Flux's blocks add residuals in place: the host keeps copies of what backward needs);
gradient checkpointing of SD 3.x's blocks leaves the gradient as it was, and is refused for Flux's; a run resumes
exactly.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import pack, tiny_models
from test_flow_training import small_config as flow_config
from test_train_comfy import PROMPTS, assert_surrogate_gradient, brightness, randomise_lora

ComfyHost = importlib.import_module(f"{pack.__name__}.training.hosts.comfy").ComfyHost
loop = importlib.import_module(f"{pack.__name__}.training.loop")
sampling = importlib.import_module(f"{pack.__name__}.training.sampling")
FAMILIES = ["sd3", "flux"]
MiB = 2 ** 20


@pytest.fixture(scope="module")
def checkpoints():
    """(MODEL, CLIP, VAE) per family, built once (SD 3.x's 4096-wide T5 takes seconds), under inference mode."""
    with torch.inference_mode():
        built = {f: tiny_models.tiny_checkpoint(f, 0, True) for f in FAMILIES}
        # Flux schnell: the same CLIP-L + T5 and VAE; the transformer without guidance embedding, shift 1
        built["schnell"] = (tiny_models.tiny_transformer("flux", 0, True, schnell=True), *built["flux"][1:])
        return built


def host_of(checkpoints, family: str, encoders=None, seed: int = 0) -> ComfyHost:
    model, clip, vae = checkpoints[family]
    with torch.inference_mode():
        return ComfyHost(model, clip, vae, rank=4, alpha=4.0, seed=seed, encoders=encoders)


def comfy_cond(clip, text: str, **extra) -> list:
    c, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[c, {"pooled_output": pooled, **extra}]]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_host_knows_the_family_and_puts_a_lora_on_t5(checkpoints, family):
    host = host_of(checkpoints, family)
    assert host.flow and host.family == family and host.distilled_guidance == (family == "flux")
    t5 = [path for slot, path in host.lora.keys if slot == "te3"]
    assert len(t5) == 2 * 4 and all(p.startswith("encoder.block.") and p.endswith(("q", "k", "v", "o")) for p in t5)
    only_t5 = host_of(checkpoints, family, ["t5xxl"])
    assert {slot for slot, _ in only_t5.lora.keys} == {"te3"}
    if family == "flux":
        with pytest.raises(ValueError, match=r"cannot train CLIP-G: this CLIP is Flux \(CLIP-L \+ T5-XXL\), which "
                                             r"has CLIP-L \+ T5-XXL only"):
            host_of(checkpoints, family, ["clip_g"])


@pytest.mark.parametrize("family", [*FAMILIES, "schnell"])
def test_without_noise_the_chain_is_comfys_own_euler_sampler(checkpoints, family):
    """SD 3.x: KSampler euler / simple at cfg 3 with the negative prompt. Flux: cfg 1 (ComfyUI's one pass) with
    guidance 3 in the conditioning, as FluxGuidance puts it; the pack's chain from the same noise must match.
    Flux schnell: cfg 1 and no guidance (its workflows have no FluxGuidance; its model has no guidance input), on
    its own shift-1 times."""
    import comfy.sample

    model, clip, vae = checkpoints[family]
    host = host_of(checkpoints, family)
    cfg = flow_config(guidance=3.0)
    tr = loop.Trainer(host, brightness, PROMPTS, cfg)
    seed, prompts = 123, [PROMPTS[0]] * 2
    with torch.inference_mode(False), torch.no_grad():
        traj, _ = sampling.sample(host, cfg, tr._sched, prompts, seed, brightness, lambda: None,
                                  stochastic=torch.zeros(2, cfg.num_steps, dtype=torch.bool))
    shape = host.latent_shape(32, 32)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(2)])
    extra, scale = {"flux": ({"guidance": 3.0}, 1.0), "schnell": ({}, 1.0)}.get(family, ({}, 3.0))
    with torch.inference_mode():
        theirs = comfy.sample.sample(model, noise, cfg.num_steps, scale, "euler", "simple",
                                     comfy_cond(clip, PROMPTS[0], **extra),
                                     comfy_cond(clip, cfg.negative_prompt, **extra), torch.zeros_like(noise),
                                     denoise=1.0, seed=seed)
    ours = model.model.process_latent_out(traj.latents[:, -1])
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_flux_guidance_is_the_models_input_and_the_negative_prompt_is_unused(checkpoints):
    host = host_of(checkpoints, "flux")
    x = torch.randn(2, *host.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.6)
    with torch.inference_mode(False), torch.no_grad():
        cond = host.encode(PROMPTS[:2])
        outs = {}
        for negative, guidance in (("", 3.5), ("blurry, ugly", 3.5), ("", 1.5)):
            with host.predictor(cond, host.encode([negative]), guidance) as predict:
                outs[(negative, guidance)] = predict(x, t)
    assert torch.equal(outs[("", 3.5)], outs[("blurry, ugly", 3.5)])
    assert (outs[("", 3.5)] - outs[("", 1.5)]).abs().max() > 1e-4


def test_the_gradient_through_a_t5_lora_equals_finite_differences(checkpoints):
    """The whole path from the T5 LoRA: ComfyUI's T5 (out-of-place for training), the Flux transformer under its
    distilled guidance (with copies of saved activations), the fp32 Flow-GRPO log-prob."""
    host = host_of(checkpoints, "flux", ["t5xxl"])
    randomise_lora(host)
    tr = loop.Trainer(host, brightness, PROMPTS, flow_config(loss="sf", num_steps=3, train_batch_size=4,
                                                            gradient_accumulation_steps=1))
    assert_surrogate_gradient(host, tr, eps=3e-5)


def test_gradient_checkpointing_of_the_transformer_blocks_gives_the_same_gradient(checkpoints):
    family = "sd3"
    grads = []
    for checkpointing in (False, True):
        host = host_of(checkpoints, family)
        host.gradient_checkpointing = checkpointing
        randomise_lora(host)
        tr = loop.Trainer(host, brightness, PROMPTS, flow_config())
        with torch.inference_mode(False):
            traj = tr.sample(PROMPTS, seed=11)
            traj.advantages = torch.tensor([1.0, -0.3, 0.7, -1.2])
            with host.training(), torch.enable_grad():
                tr.backward_microbatch(traj, torch.arange(4), torch.arange(4).repeat(4, 1), 1.0)
        grads.append(torch.cat([p.grad.flatten() for p in host.trainable_parameters()]))
        unet = checkpoints[family][0].model.diffusion_model
        blocks = [*getattr(unet, "joint_blocks", []), *getattr(unet, "double_blocks", []),
                  *getattr(unet, "single_blocks", [])]
        assert blocks and all("forward" not in b.__dict__ for b in blocks)  # restored after the pass
    assert grads[1].norm() > 0
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 1e-5


def test_gradient_checkpointing_is_turned_off_for_flux_with_a_warning(checkpoints, caplog):
    """Flux's blocks add residuals onto tensors in place: a block recomputed in backward would read them changed
    (measured: a gradient 4% off). Asking for checkpointing says so and trains without it."""
    model, clip, vae = checkpoints["flux"]
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae, rank=4, alpha=4.0, gradient_checkpointing=True)
    assert host.gradient_checkpointing is False
    assert "gradient checkpointing is off for Flux" in caplog.text


def test_flux_schnell_says_its_guidance_setting_has_no_effect(checkpoints, caplog):
    with caplog.at_level("INFO"):
        host = host_of(checkpoints, "schnell")
    assert host.family == "flux" and not host.uses_negative_prompt
    assert "no guidance input (Flux schnell)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        host_of(checkpoints, "flux")
    assert "schnell" not in caplog.text


@pytest.mark.parametrize("family", [*FAMILIES, "schnell"])
def test_a_run_resumes_exactly(checkpoints, family, tmp_path):
    def final_lora(stops: list[int]) -> torch.Tensor:
        ckpt = tmp_path / f"ckpt_{len(stops)}.pt"
        for target in stops:
            host = host_of(checkpoints, family, seed=4)
            loop.Trainer(host, brightness, PROMPTS, flow_config(epochs=3, lr=1e-2, num_steps=3),
                         checkpoint_path=ckpt).run(target)
        return torch.cat([p.detach().flatten() for p in host.trainable_parameters()])

    first = final_lora([3])
    assert first.abs().max() > 0 and torch.equal(first, final_lora([2, 3]))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_flow_grpo_preset_trains_with_its_kl_to_the_base_model(checkpoints, family):
    """Flow-GRPO's settings (group baseline with a batch-wide std, β 0.01, noise level 0.7), shrunk to two prompts:
    two epochs run, the KL to the model without the LoRA is computed on the flow step and grows from 0."""
    host = host_of(checkpoints, family)
    cfg = pack.training.config.make_config("flow_grpo", num_steps=3, images_per_epoch=8, images_per_prompt=4,
                                           sample_batch_size=4, train_batch_size=2, gradient_accumulation_steps=2,
                                           height=32, width=32, epochs=2, lora_rank=4, lora_alpha=4.0, lr=1e-2)
    assert cfg.advantage == "group_mean" and cfg.kl_weight == 0.01 and cfg.eta == 0.7
    stats = loop.Trainer(host, brightness, PROMPTS[:2], cfg).run(2)
    assert len(stats) == 2 and all(torch.isfinite(torch.tensor([s.loss, s.grad_norm, s.kl])).all() for s in stats)
    assert stats[0].optimizer_steps == 2 and stats[-1].kl > 0


def test_an_sd3_clip_without_t5_is_sd3s_not_sdxls(checkpoints):
    """sd3_medium_incl_clips loads an SD3ClipModel with CLIP-L and CLIP-G only, the encoders SDXL has: the class
    says SD 3.x, so an SD 3.x LoRA is not refused on it and the trainer writes SD 3.x's te1/te2."""
    lora_apply = importlib.import_module(f"{pack.__name__}.nodes.lora_apply")
    detect = importlib.import_module(f"{pack.__name__}.training.lora.family_detect")
    with torch.inference_mode():
        clip = tiny_models.tiny_clip("sd3", 0, t5=False)
        host = ComfyHost(tiny_models.tiny_model(0), clip, tiny_models.tiny_vae(0), rank=4, alpha=4.0)
    layout = lora_apply.ClipLayout.of(clip)
    assert layout.names == ["clip_g", "clip_l"] and layout.family == "sd3"
    assert host.family == "sd3" and {slot for slot, _ in host.lora.keys} == {"te1", "te2"}
    lora = host.lora.to_lora_set()
    lora.metadata = {"ss_base_model_version": "sd3"}
    assert detect.family_mismatch(lora, layout.family) is None
    lora.metadata = {"texforce.family": "sdxl"}
    assert "but the CLIP is SD 3.x" in detect.family_mismatch(lora, layout.family)


def test_a_scaled_fp8_t5_trains_the_lora_the_stock_loader_applies(loras_dir):
    """ComfyUI's scaled-fp8 T5 (t5xxl_fp8_e4m3fn_scaled: e4m3 weights × a per-layer scale_weight) hands weight
    wrappers the stored weight and multiplies by the scale afterwards: the trained LoRA must still be the ΔW that
    ComfyUI's stock LoraLoader (which patches W itself) applies, not ΔW × scale."""
    from lora_builders import encode
    from test_lora_loading import assert_same, stock_lora_loader

    with torch.inference_mode():
        clip = tiny_models.tiny_clip("flux", 0, t5_scaled_fp8=0.25)
        host = ComfyHost(tiny_models.tiny_transformer("flux", 0), clip, tiny_models.tiny_vae(0, latent_channels=16),
                         rank=4, alpha=4.0, encoders=["t5xxl"])
    t5_q = clip.cond_stage_model.t5xxl.transformer.encoder.block[0].layer[0].SelfAttention.q
    assert t5_q.weight.dtype == torch.float8_e4m3fn and float(t5_q.scale_weight) == 0.25
    randomise_lora(host, std=0.5)
    with torch.inference_mode(False), torch.no_grad():
        trained = host.encode(["a red apple"])
    path = pack.training.lora.save_kohya(host.lora.to_lora_set("trained"), loras_dir / "fp8_t5.safetensors",
                                         family="flux")
    _, stock = stock_lora_loader(clip, path.name, 1.0)
    with torch.inference_mode():
        stock_cond, stock_pooled = encode(stock, "a red apple")
        base_cond, _ = encode(clip, "a red apple")
    moved = (stock_cond - base_cond).norm()
    error = (trained["cross_attn"] - stock_cond).norm()
    print(f"LoRA moved T5's output by {moved:.4g}; trainer vs stock loader {error:.4g} ({error / moved:.3f})")
    # the stock loader rounds the patched weight back to e4m3 (the trainer adds ΔW in fp32): not bit-equal, but a
    # LoRA applied ×scale would be 75% off
    assert moved > 1e-2 and error < 0.1 * moved
    assert_same((stock_pooled,), (trained["pooled"],), tol=1e-6)  # CLIP-L: no LoRA, not fp8


@pytest.mark.parametrize("family", FAMILIES)
def test_the_negative_prompt_keeps_no_encoder_graph_where_the_model_never_reads_it(checkpoints, family):
    """Flux has no negative pass: its negative prompt is encoded without gradient in the training pass (no T5
    activations kept for it); SD 3.x's goes through the LoRA'd encoders with its gradient, as CFG reads it."""
    host = host_of(checkpoints, family)
    with torch.inference_mode(False), host.training(), torch.enable_grad():
        negative = sampling.encode_negative(host, flow_config())
    assert all(v.requires_grad for v in negative.values()) == (family == "sd3")
    assert host.uses_negative_prompt == (family == "sd3")


def test_flux_in_bf16_keeps_the_ratio_exactly_one_and_trains_t5(checkpoints):
    """Flux as ComfyUI runs it on GPUs: the transformer in bf16 (computing in bf16), CLIP-L and T5 with bf16
    weights; the LoRA and the log-prob stay fp32, re-scoring gives the stored log-probs exactly, and a PPO update
    raises the surrogate."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    from test_train_comfy import assert_ratio_one_and_update_raises_surrogate

    model, clip, vae = checkpoints["flux"]

    def rounded(state):
        return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}

    with torch.inference_mode():
        cfg = comfy.supported_models.Flux(dict(tiny_models.TINY_FLUX))
        cfg.set_inference_dtype(torch.bfloat16, None)
        base = cfg.get_model({}, device=torch.device("cpu"))
        base.load_state_dict(rounded(model.model.state_dict()))
        half_model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                      offload_device=mm.unet_offload_device())
        half_clip = comfy.sd.CLIP(target=tiny_models._make_clip("flux"),
                                  model_options={"dtype": torch.bfloat16, **tiny_models._flow_clip_options("flux")})
        half_clip.cond_stage_model.load_state_dict(rounded(clip.cond_stage_model.state_dict()))
        host = ComfyHost(half_model, half_clip, vae, rank=4, alpha=4.0, encoders=["t5xxl"])
    t5_q = half_clip.cond_stage_model.t5xxl.transformer.encoder.block[0].layer[0].SelfAttention.q
    assert t5_q.weight.dtype == torch.bfloat16 and next(base.diffusion_model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in host.trainable_parameters())
    randomise_lora(host, std=0.05)
    tr = loop.Trainer(host, brightness, PROMPTS, flow_config(lr=1e-3, train_batch_size=4,
                                                            gradient_accumulation_steps=1, clip_range=10.0))
    assert_ratio_one_and_update_raises_surrogate(host, tr)


def test_the_encoders_weight_copies_are_recomputed_in_backward_not_kept(checkpoints, monkeypatch):
    """ComfyUI's ops copy every wrapped weight per forward and a linear saves its copy (as W or Wᵀ) for backward:
    with gradient, a T5-XXL forward would keep 19 GB. The host has autograd keep recipes instead: no tensor of a
    weight's shape is saved, and the LoRA's gradient is bit for bit the one of keeping the copies."""
    import contextlib

    comfy_host = importlib.import_module(f"{pack.__name__}.training.hosts.comfy")
    host = host_of(checkpoints, "sd3")
    weights = {tuple(m.weight.shape) for m in host.clip.cond_stage_model.modules() if isinstance(m, torch.nn.Linear)}
    weights |= {s[::-1] for s in weights}
    kept_shapes: list[tuple[int, ...]] = []
    original = comfy_host.WeightCopies._pack

    def recording(self, t):
        out = original(self, t)
        if isinstance(out, torch.Tensor):
            kept_shapes.append(tuple(out.shape))
        return out

    def lora_gradient() -> torch.Tensor:
        for p in host.lora.parameters():
            p.grad = None
        with torch.inference_mode(False), host.training(), torch.enable_grad():
            out = host.encode(["a red apple", "a blue car"])
            (out["cross_attn"].square().mean() + out["pooled"].square().mean()).backward()
        return torch.cat([p.grad.flatten() for p in host.lora.parameters()])

    def kept_after_forward() -> int:
        """Bytes a forward with gradient leaves allocated (what its graph holds, and the output)."""
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(False), host.training(), torch.enable_grad():
            host.encode(["warm up"])
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = host.encode(["a red apple"])
            kept = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage)
            del out
        return kept

    randomise_lora(host)
    monkeypatch.setattr(comfy_host.WeightCopies, "_pack", recording)
    recomputed, kept = lora_gradient(), kept_after_forward()
    assert kept_shapes and not set(kept_shapes) & weights, set(kept_shapes) & weights
    monkeypatch.setattr(host.weight_copies, "recomputed", contextlib.nullcontext)  # the copies kept, as before
    assert recomputed.abs().sum() > 0 and torch.equal(recomputed, lora_gradient())
    # the memory is released too (a recipe holding the copy would keep it): at least the T5 weights' bytes the
    # linears of blocks after the first saved (block 0's q/k/v input carries no gradient: no weight saved there)
    t5 = host.clip.cond_stage_model.t5xxl.transformer.encoder.block
    saved_weights = sum(m.weight.numel() * 4 for i, b in enumerate(t5) for name, m in b.named_modules()
                        if isinstance(m, torch.nn.Linear) and not (i == 0 and name[-1] in "qkv"))
    copies_kept = kept_after_forward()
    assert copies_kept - kept > 0.9 * saved_weights, (copies_kept / MiB, kept / MiB, saved_weights / MiB)
