"""The headless (diffusers) host on SD 3.x and Flux: StableDiffusion3Pipeline (CLIP-L + CLIP-G + T5-XXL, SD3
transformer) and FluxPipeline (CLIP-L + T5, Flux transformer with the guidance embedding), as tiny models.

The pipelines carry the weights of ComfyUI's own tiny SD 3.x / Flux checkpoint (tiny_models.tiny_checkpoint:
MMDiT / Flux converted by diffusers' single-file converters, SD3ClipModel / FluxClipModel, the VAE), so the
conditioning can be compared with what ComfyUI computes (with the trained LoRA loaded by ComfyUI's stock loader),
and the velocity, log-probs, decoded images, initial LoRA and gradients with the ComfyUI host's. The flow times are compared with ComfyUI's `simple` scheduler on the model
sampling ComfyUI gives these models. Training runs end to end through TrainingRun (the CLI's path): finite losses,
a LoRA that moves on every encoder including T5 (te3), ratio exactly 1 before the first update, a saved file with
T5 modules, and a resumed run that ends where an uninterrupted one does.
"""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from conftest import REPO, pack
from diffusers_builders import write_tiny_flow
from test_headless_families import assert_same_initial_lora, surrogate_gradients

dhost = importlib.import_module(f"{pack.__name__}.training.hosts.diffusers")
loop = importlib.import_module(f"{pack.__name__}.training.loop")
config = importlib.import_module(f"{pack.__name__}.training.config")
run_mod = importlib.import_module(f"{pack.__name__}.training.run")
family_mod = importlib.import_module(f"{pack.__name__}.training.lora.family")

FAMILIES = ["sd3", "flux"]
PROMPTS = ["a red apple", "a blue car", "a red apple"]
ComfyHost = importlib.import_module(f"{pack.__name__}.training.hosts.comfy").ComfyHost
flow_step = importlib.import_module(f"{pack.__name__}.training.flow_step")
ENCODERS = {"sd3": ["clip_g", "clip_l", "t5xxl"], "flux": ["clip_l", "t5xxl"]}
CLIP_SLOTS = {"sd3": {"te1", "te2"}, "flux": {"te1"}}
T5_BLOCKS = 2  # tiny_models.t5_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per family: the saved diffusers folder and the ComfyUI CLIP whose weights its text encoders carry."""
    return {f: write_tiny_flow(tmp_path_factory.mktemp(f"tiny_{f}"), f) for f in FAMILIES}


def make_host(d: dict, seed: int = 7, encoders: list[str] | None = None):
    return dhost.DiffusersHost(dhost.load_pipeline(d["folder"]), rank=4, alpha=4.0, seed=seed, encoders=encoders)


def random_lora(host, seed: int = 3) -> dict[str, torch.Tensor]:
    """A non-zero LoRA in the host's own state form (lora_up random), loaded into the host."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) * 0.2 if "lora_up" in k else v) for k, v in host.lora_state().items()}
    host.load_lora_state(state)
    return state


def comfy_with_lora(clip, state: dict[str, torch.Tensor]):
    """ComfyUI's CLIP with the LoRA applied by ComfyUI's own key mapping; every module must be matched."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    patches = comfy.lora.load_lora(state, key_map)
    modules = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    assert len(patches) == len(modules), sorted(modules - {k for k in key_map if k in modules})[:3]
    patched = clip.clone()
    patched.add_patches(patches, 1.0)
    return patched


def comfy_encode(clip, prompts: list[str]) -> dict[str, torch.Tensor]:
    outs = [clip.encode_from_tokens(clip.tokenize(p), return_pooled=True) for p in prompts]
    return {"cross_attn": torch.cat([c for c, _ in outs]).float(), "pooled": torch.cat([p for _, p in outs]).float()}


def small_config(**kw):
    """Batches of one image at sampling and training: CPU matmuls are not batch-size invariant (a batch of 4 vs 2
    moves SD3's log-probs by ~1e-7), and the ratio-is-exactly-1 check needs the same computation both times."""
    base = dict(num_steps=3, timestep_fraction=1.0, images_per_epoch=4, images_per_prompt=2, sample_batch_size=1,
                train_batch_size=1, gradient_accumulation_steps=2, height=32, width=32, epochs=2, lora_rank=4,
                lora_alpha=4.0, eta=0.7, lr=1e-2, guidance=4.0)
    return config.make_config(kw.pop("preset", "texforce"), **{**base, **kw})


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


# -- the pipeline and its LoRA ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_family_encoders_and_lora_targets(tiny, family):
    """Detected from the folder; LoRA keys on q/k/v/out of every CLIP layer (te1/te2) and q/k/v/o of every T5
    block (te3); the LoRA starts as a no-op (lora_up zero)."""
    host = make_host(tiny[family])
    assert host.family == family and host.flow and host.alphas_cumprod is None
    assert host.encoders == ENCODERS[family]
    slots = {slot for slot, _ in host.keys}
    assert slots == CLIP_SLOTS[family] | {"te3"}
    t5 = sorted(path for slot, path in host.keys if slot == "te3")
    assert t5 == sorted(family_mod.t5_module_path(b, f"layer.0.SelfAttention.{p}")
                        for b in range(T5_BLOCKS) for p in family_mod.T5_PROJECTIONS)
    state = host.lora_state()
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in state
    assert all(not v.any() for k, v in state.items() if "lora_up" in k)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_encoder_alone(tiny, family):
    """Training T5 alone: only te3 keys, only T5's peft layers trainable."""
    host = make_host(tiny[family], encoders=["t5xxl"])
    assert host.encoders == ["t5xxl"] and {slot for slot, _ in host.keys} == {"te3"}


def test_pipeline_kinds_are_told_apart(tiny):
    """Flux's two encoders are the attributes SDXL's are: the T5 and the transformer tell them apart; an SD3
    pipeline loaded without its T5 is refused, saying so."""
    pipe = dhost.load_pipeline(tiny["flux"]["folder"])
    assert dhost.family_of(pipe) == "flux"
    sd3 = dhost.load_pipeline(tiny["sd3"]["folder"])
    sd3.text_encoder_3 = None
    with pytest.raises(dhost.PipelineLoadError, match="no T5-XXL text encoder"):
        dhost.family_of(sd3)


# -- schedule -----------------------------------------------------------------------------------------------
def _comfy_sampling(name: str):
    import comfy.model_base
    import comfy.supported_models

    cls = getattr(comfy.supported_models, name)
    model_type = {"SD3": comfy.model_base.ModelType.FLOW, "Flux": comfy.model_base.ModelType.FLUX,
                  "FluxSchnell": comfy.model_base.ModelType.FLOW}[name]
    return comfy.model_base.model_sampling(cls({}), model_type)


@pytest.mark.parametrize("name,family,guidance_embeds", [("SD3", "sd3", False), ("Flux", "flux", True),
                                                         ("FluxSchnell", "flux", False)])
@pytest.mark.parametrize("steps", [1, 3, 7, 28, 50])
def test_times_are_comfys_simple_scheduler(tiny, name, family, guidance_embeds, steps):
    import comfy.samplers

    sampling = _comfy_sampling(name)
    scheduler = dhost.load_pipeline(tiny[family]["folder"]).scheduler.config
    sigmas, scale = dhost.comfy_flow_sampling(family, scheduler, guidance_embeds)
    torch.testing.assert_close(sigmas, sampling.sigmas.float(), rtol=0, atol=0)
    times = dhost.simple_times(sigmas, steps)
    assert torch.equal(times, comfy.samplers.calculate_sigmas(sampling, "simple", steps).float())
    assert scale == float(sampling.timestep(torch.tensor(1.0)))  # the model is called at t·scale


def test_host_schedule_is_a_flow_schedule(tiny):
    flow_step = importlib.import_module(f"{pack.__name__}.training.flow_step")
    for family in FAMILIES:
        host = make_host(tiny[family])
        sched = host.sampler_schedule(4)
        assert isinstance(sched, flow_step.FlowSchedule) and sched.times[0] == 1 and sched.times[-1] == 0
        assert torch.equal(sched.times, dhost.simple_times(host._sigmas, 4))


# -- conditioning: what ComfyUI computes ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_conditioning_matches_comfyui(tiny, family, caplog):
    """Same weights, same non-zero LoRA (the host's kohya state loaded by ComfyUI's stock key mapping, every
    module matched): the same context (SD3: 77 CLIP tokens + 77 T5 tokens, 4096 wide; Flux: 256 T5 tokens) and
    pooled vector (SD3: CLIP-L un-projected ‖ CLIP-G projected; Flux: CLIP-L un-projected)."""
    d = tiny[family]
    host = make_host(d)
    state = random_lora(host)
    prompts = PROMPTS + ["", "a photograph of an astronaut riding a horse, highly detailed"]
    with torch.no_grad():
        ours = host.encode(prompts)
        ref = comfy_encode(comfy_with_lora(d["clip"], state), prompts)
        with host.lora_enabled(False):
            base = host.encode(prompts)
        plain = comfy_encode(d["clip"], prompts)
    tokens = {"sd3": 77 + 77, "flux": 256}[family]
    assert ours["cross_attn"].shape == ref["cross_attn"].shape == (len(prompts), tokens, {"sd3": 4096, "flux": 64}[family])
    assert ours["pooled"].shape == ref["pooled"].shape
    for k in ("cross_attn", "pooled"):
        scale = float(ref[k].abs().max())
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(base[k], plain[k], rtol=1e-4, atol=1e-5 * scale)
        assert (ours[k] - base[k]).abs().max() > 1e-3 * scale, k  # the LoRA matters on every output compared
    t5_rows = slice(77, None) if family == "sd3" else slice(None)
    assert (ours["cross_attn"][:, t5_rows] - base["cross_attn"][:, t5_rows]).abs().max() > 1e-3  # T5's LoRA too


def test_sd3_clip_l_pooled_is_not_projected(tiny):
    """ComfyUI reads CLIP-L's pooled output before its projection on SD3 (diffusers' own converter sets that
    projection to the identity); the tiny CLIP-L's projection is random, so the projected one would differ."""
    host = make_host(tiny["sd3"])
    te = host.pipe.text_encoder
    assert not torch.allclose(te.text_projection.weight, torch.eye(te.text_projection.weight.shape[0]))
    with torch.no_grad():
        pooled = host.encode(["a red apple"])["pooled"]
        ref = comfy_encode(tiny["sd3"]["clip"], ["a red apple"])["pooled"]
    width = te.config.hidden_size
    torch.testing.assert_close(pooled[:, :width], ref[:, :width], rtol=1e-4, atol=1e-5)


# -- prediction ----------------------------------------------------------------------------------------------
def _calls(module: torch.nn.Module) -> list[int]:
    """Batch sizes of every forward of `module` (a hook), to count passes."""
    seen: list[int] = []
    module.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["hidden_states"].shape[0]),
                                 with_kwargs=True)
    return seen


def test_flux_guidance_is_an_input_and_there_is_no_negative_pass(tiny):
    host = make_host(tiny["flux"])
    x = torch.randn(2, *host.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.75)
    seen = _calls(host.denoiser)
    with torch.no_grad():
        cond, uncond = host.encode(PROMPTS[:2]), host.encode([""])
        other = {k: torch.randn_like(v) for k, v in uncond.items()}
        outs = {}
        for g, un in ((3.5, uncond), (3.5, other), (1.0, uncond)):
            with host.predictor(cond, un, g) as predict:
                outs[(g, un is other)] = predict(x, t)
    assert seen == [2, 2, 2]  # one pass of the batch per call: no negative pass
    torch.testing.assert_close(outs[(3.5, False)], outs[(3.5, True)], rtol=0, atol=0)  # the negative is not read
    assert (outs[(3.5, False)] - outs[(1.0, False)]).abs().max() > 1e-4  # the guidance reaches the model
    assert outs[(3.5, False)].shape == x.shape and outs[(3.5, False)].dtype == torch.float32


def test_sd3_guidance_is_cfg_on_the_velocity(tiny):
    host = make_host(tiny["sd3"])
    x = torch.randn(2, *host.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.75)
    seen = _calls(host.denoiser)
    with torch.no_grad():
        cond, uncond = host.encode(PROMPTS[:2]), host.encode([""])
        with host.predictor(cond, uncond, 4.0) as predict:
            guided = predict(x, t)
        with host.predictor(cond, uncond, 1.0) as predict:
            v_c = predict(x, t)
        with host.predictor(uncond, uncond, 1.0) as predict:
            v_u = predict(x, t)
    assert seen == [4, 2, 2]  # guided: negative and positive in one batch
    torch.testing.assert_close(guided, v_u + 4.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    assert (v_c - v_u).abs().max() > 1e-4  # the prompt reaches the model


@pytest.mark.parametrize("family", FAMILIES)
def test_model_time_and_latent_layout(tiny, family):
    """SD3's transformer gets t·1000, Flux's t (it scales by 1000 itself); Flux's 2×2 patches are packed and
    unpacked as diffusers' FluxPipeline does (so the velocity of a latent is the pipeline's, position by position)."""
    host = make_host(tiny[family])
    x = torch.randn(1, *host.latent_shape(32, 48), generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    host.denoiser.register_forward_hook(lambda m, a, kw, o: seen.append(kw["timestep"].clone()), with_kwargs=True)
    with torch.no_grad():
        cond = host.encode(PROMPTS[:1])
        with host.predictor(cond, cond, 1.0) as predict:
            v = predict(x, torch.tensor([0.5]))
    assert float(seen[0][0]) == {"sd3": 500.0, "flux": 0.5}[family]
    if family == "flux":
        pipe = host.pipe
        packed = pipe._pack_latents(x, 1, 16, x.shape[2], x.shape[3])
        ids = pipe._prepare_latent_image_ids(1, x.shape[2] // 2, x.shape[3] // 2, x.device, x.dtype)
        with torch.no_grad():
            out = host.denoiser(hidden_states=packed, encoder_hidden_states=cond["cross_attn"],
                                pooled_projections=cond["pooled"], timestep=torch.tensor([0.5]), img_ids=ids,
                                txt_ids=torch.zeros(cond["cross_attn"].shape[1], 3),
                                guidance=torch.tensor([1.0]), return_dict=False)[0]
        ref = pipe._unpack_latents(out, 32, 48, pipe.vae_scale_factor)
        torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="multiples of 16"):
            host.latent_shape(40, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_uses_the_vae_shift(tiny, family):
    host = make_host(tiny[family])
    vae = host.vae
    z = torch.randn(1, *host.latent_shape(32, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    images = host.decode(z)
    assert images.shape == (1, 32, 32, 3)
    torch.testing.assert_close(images, ((ref + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


# -- training ------------------------------------------------------------------------------------------------
def _run(d: dict, out, epochs: int, resume: bool = True):
    host = make_host(d, seed=0)
    files = run_mod.RunFiles(lora=out / "lora.safetensors", folder=out)
    job = run_mod.TrainingRun(host, brightness, PROMPTS[:2], small_config(), files, name="tiny", resume=resume)
    history = job.run(epochs)
    return host, job, history


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_end_to_end_and_resumes_exactly(tiny, family, tmp_path):
    """Two epochs through TrainingRun: finite losses, ratio exactly 1 before each epoch's first update, every
    encoder's LoRA (T5 too) moves, the file has te3 T5 modules and the family; one epoch + a resumed one (a new
    host on a newly loaded pipeline) ends with the LoRA of the uninterrupted run."""
    from safetensors import safe_open

    d = tiny[family]
    host, job, history = _run(d, tmp_path / "whole", 2)
    assert len(history) == 2
    for h in history:
        assert torch.isfinite(torch.tensor([h["loss"], h["reward_mean"]])).all()
        assert h["ratio_error_before_update"] == 0.0
    state = host.lora_state()
    moved = {k.split("_")[1] for k, v in state.items() if "lora_up" in k and v.abs().max() > 0}
    assert moved == CLIP_SLOTS[family] | {"te3"}
    with safe_open(str(job.files.lora), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["texforce.family"] == family
    t5 = {k for k in keys if k.startswith("lora_te3_encoder_block_")}
    assert len(t5) == 3 * T5_BLOCKS * len(family_mod.T5_PROJECTIONS)  # down, up, alpha
    assert keys == set(state)

    part, _, first = _run(d, tmp_path / "resumed", 1)
    assert len(first) == 1
    resumed, _, rest = _run(d, tmp_path / "resumed", 2)
    assert [h["epoch"] for h in rest] == [1, 2]
    for k, v in resumed.lora_state().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_reloads_into_a_new_host(tiny, family, tmp_path):
    """The kohya file the run writes loads back (the host's own loader) to the same LoRA and conditioning."""
    from safetensors.torch import load_file

    host, job, _ = _run(tiny[family], tmp_path, 1)
    other = make_host(tiny[family], seed=5)
    other.load_lora_state(load_file(str(job.files.lora)))
    for k, v in host.lora_state().items():
        torch.testing.assert_close(other.lora_state()[k], v, rtol=0, atol=0, msg=k)
    with torch.no_grad():
        a, b = host.encode(PROMPTS), other.encode(PROMPTS)
    torch.testing.assert_close(a["cross_attn"], b["cross_attn"], rtol=0, atol=0)


def test_cli_trains_flux_and_comfyui_loads_the_file(tiny, tmp_path):
    """train.py's CLI on the Flux folder (its native size overridden): the file has te1 and te3 keys and the Flux
    family, and ComfyUI's stock key mapping applies it to the CLIP with the conditioning the diffusers host gives."""
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file

    from test_headless_cli import WORKER, _env, _ok

    d = tiny["flux"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\n")
    out = tmp_path / "run"
    settings = ["num_steps=3", "images_per_epoch=4", "images_per_prompt=2", "sample_batch_size=2",
                "train_batch_size=1", "gradient_accumulation_steps=2", "height=32", "width=32", "lora_rank=4",
                "lora_alpha=4.0", "lr=0.01", "epochs=1", "eta=0.7", "guidance=3.5"]
    args = ["--model", str(d["folder"]), "--prompts", str(prompts), "--output", str(out), "--reward",
            "jpeg_compressibility", "--name", "tiny_flux", *[a for s in settings for a in ("--set", s)]]
    proc = subprocess.run([sys.executable, str(WORKER), *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    _ok(proc)
    path = out / "tiny_flux.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["texforce.family"] == "flux"
    assert {k.split("_")[1] for k in keys} == {"te1", "te3"}
    state = load_file(str(path))
    host = make_host(d)
    host.load_lora_state(state)
    with torch.no_grad():
        ours = host.encode(["a red apple"])
        ref = comfy_encode(comfy_with_lora(d["clip"], state), ["a red apple"])
    for k in ("cross_attn", "pooled"):
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-4)


# -- parity with the ComfyUI host on the same weights ----------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def hosts(request, tiny):
    """(ComfyUI host, diffusers host) on the same weights with the same non-zero LoRA."""
    d = tiny[request.param]
    with torch.inference_mode():
        comfy_host = ComfyHost(d["model"], d["clip"], d["vae"], rank=4, alpha=4.0, seed=7)
    diff_host = make_host(d)
    state = random_lora(diff_host)
    with torch.inference_mode(False):
        comfy_host.load_lora_state(state)
    return request.param, comfy_host, diff_host


def test_same_schedule_and_initial_lora(tiny):
    for family in FAMILIES:
        d = tiny[family]
        with torch.inference_mode():
            comfy_host = ComfyHost(d["model"], d["clip"], d["vae"], rank=4, alpha=4.0, seed=11)
        diff_host = make_host(d, seed=11)
        assert comfy_host.family == diff_host.family == family and comfy_host.encoders == diff_host.encoders
        for n in (3, 10):
            assert torch.equal(comfy_host.sampler_schedule(n).times, diff_host.sampler_schedule(n).times)
        assert_same_initial_lora(comfy_host, diff_host)


def test_same_conditioning_as_the_comfy_host(hosts):
    family, comfy_host, diff_host = hosts
    with torch.no_grad():
        ref, ours = comfy_host.encode(PROMPTS + [""]), diff_host.encode(PROMPTS + [""])
    for k in ("cross_attn", "pooled"):
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5 * float(ref[k].abs().max()))


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_same_velocity_and_log_probs(hosts, guidance):
    """The guided velocity (SD3: CFG; Flux: the guidance embedding) at one step of the run's schedule, and the
    Flow-GRPO log-prob each host gives the step the ComfyUI host sampled."""
    family, comfy_host, diff_host = hosts
    sched = comfy_host.sampler_schedule(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *diff_host.latent_shape(32, 32), generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = sched.model_time(1, 3)
    vs = []
    for h in (comfy_host, diff_host):
        with torch.no_grad():
            cond, uncond = h.encode(PROMPTS), h.encode([""])
            with h.predictor(cond, uncond, guidance) as predict:
                vs.append(predict(x, t).cpu())
    assert vs[0].abs().mean() > 0.1
    torch.testing.assert_close(vs[1], vs[0], rtol=1e-4, atol=1e-4)
    prev, lp0, _, _ = sched.step(x, vs[0], 1, 0.7, noise=noise)
    other = sched.step(x, vs[0], 1, 0.7, noise=torch.randn(x.shape, generator=g))[0]
    for target in (prev, other):
        ref = sched.step(x, vs[0], 1, 0.7, prev_sample=target)[1]
        torch.testing.assert_close(sched.step(x, vs[1], 1, 0.7, prev_sample=target)[1], ref, rtol=1e-5, atol=1e-4)


def test_same_decoded_images(hosts):
    family, comfy_host, diff_host = hosts
    z = torch.randn(2, *diff_host.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    ref = comfy_host.decode(z).cpu()
    assert ref.shape == (2, 32, 32, 3) and ref.std() > 1e-2
    torch.testing.assert_close(diff_host.decode(z).cpu(), ref, rtol=1e-4, atol=1e-4)


def test_same_gradients(hosts):
    """One surrogate backward through the same sampled chain on each host: the same LoRA gradients (T5's too)."""
    family, comfy_host, diff_host = hosts
    cfg = small_config(num_steps=3, images_per_epoch=2, images_per_prompt=1, sample_batch_size=2, train_batch_size=2,
                       gradient_accumulation_steps=1)
    ref, ours = ({k: g for k, g in grads.items() if g is not None}
                 for grads in surrogate_gradients((comfy_host, diff_host), cfg))
    assert ref.keys() == ours.keys() and any(k.split(":")[1] == "te3" for k in ref)
    norm = sum(float(g.norm()) for g in ref.values())
    assert norm > 0
    for k, g in ref.items():
        torch.testing.assert_close(ours[k], g, rtol=2e-3, atol=1e-5 * norm, msg=str(k))
