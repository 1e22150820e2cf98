"""Parity between the ComfyUI host and the diffusers host for SD 2.x (v-prediction) and SDXL, on the same tiny weights.

As tests/test_headless_parity.py does for SD1: a tiny model of the family is built from ComfyUI's own classes,
written by ComfyUI's save_checkpoint as an original single-file checkpoint (SD2: `cond_stage_model.model.*`
OpenCLIP keys; SDXL: `conditioner.embedders.0/1`), read by diffusers' single-file loader with a config folder
describing the same architecture, and read again from the diffusers folder that pipeline saves. The ComfyUI host
and both diffusers hosts, with the same non-zero LoRA, must give the same conditioning (and SDXL's pooled
output), the same guided ε (SDXL: with the size conditioning ComfyUI builds from the latent), the same DDIM
log-probs, decoded images and LoRA gradients, and start from the same LoRA; for SDXL also per encoder trained.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import pack, tiny_models
from diffusers_builders import write_tiny

ComfyHost = importlib.import_module(f"{pack.__name__}.training.hosts.comfy").ComfyHost
dhost = importlib.import_module(f"{pack.__name__}.training.hosts.diffusers")
ddim = importlib.import_module(f"{pack.__name__}.training.ddim")
loop = importlib.import_module(f"{pack.__name__}.training.loop")
config = importlib.import_module(f"{pack.__name__}.training.config")

PROMPTS = ["a red apple", "a blue car", "a red apple"]
FAMILIES = ["sd2", "sdxl"]
# SDXL: a non-square image, so that height and width in the size conditioning cannot be swapped unnoticed
SIZE = {"sd1": (32, 32), "sd2": (32, 32), "sdxl": (32, 48)}
ENCODER_CHOICES = {"sd2": [None, ["clip_h"]], "sdxl": [None, ["clip_l"], ["clip_g"]]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per family: the single file, its config folder, the saved diffusers folder and the ComfyUI objects."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"tiny_{family}")
        d = write_tiny(root, family, learnable=True)
        dhost.load_pipeline(d["checkpoint"], config=d["config"]).save_pretrained(root / "folder")
        out[family] = {**d, "folder": root / "folder"}
    return out


def make_hosts(d: dict, encoders: list[str] | None = None, seed: int = 7, rank: int = 4) -> list:
    """(ComfyUI host, diffusers host from the single file, diffusers host from the saved folder)."""
    with torch.inference_mode():
        comfy_host = ComfyHost(d["model"], d["clip"], d["vae"], rank=rank, alpha=float(rank), seed=seed,
                               encoders=encoders)
    single = dhost.load_pipeline(d["checkpoint"], config=d["config"])
    folder = dhost.load_pipeline(d["folder"])
    return [comfy_host] + [dhost.DiffusersHost(p, rank=rank, alpha=float(rank), seed=seed, encoders=encoders)
                           for p in (single, folder)]


def load_random_lora(hosts: list, seed: int = 3) -> None:
    """The same non-zero LoRA in every host, through each host's own state loading."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) * 0.2 if "lora_up" in k else v)
             for k, v in hosts[1].lora_state().items()}
    for h in hosts:
        with torch.inference_mode(False):
            h.load_lora_state(state)


@pytest.fixture(scope="module", params=FAMILIES)
def family_hosts(request, tiny):
    hosts = make_hosts(tiny[request.param])
    load_random_lora(hosts)
    return request.param, hosts


@pytest.mark.parametrize("family,encoders", [(f, e) for f in FAMILIES for e in ENCODER_CHOICES[f]],
                         ids=lambda v: v if isinstance(v, str) else ("all" if v is None else "+".join(v)))
def test_same_family_schedule_and_initial_lora(tiny, family, encoders):
    """Same family and encoders detected, same schedule, and for the same seed the same LoRA keys (kohya slots
    te / te1 / te2 as the ComfyUI host assigns them, CLIP-G alone staying te2), values and parameter layout."""
    comfy_host, *diffusers_hosts = make_hosts(tiny[family], encoders, seed=11)
    ref = comfy_host.lora_state()
    slots = {"clip_l": "te1", "clip_g": "te2"} if family == "sdxl" else {"clip_h": "te"}
    assert {k.split("_text_model_")[0].removeprefix("lora_") for k in ref} == {slots[e] for e in encoders or slots}
    for h in diffusers_hosts:
        assert h.family == comfy_host.family == family
        assert h.encoders == comfy_host.encoders
        torch.testing.assert_close(h.alphas_cumprod, comfy_host.alphas_cumprod, rtol=1e-6, atol=1e-7)
        assert_same_initial_lora(h, comfy_host)


def assert_same_initial_lora(a, b) -> None:
    """Two hosts start from the same LoRA: the same keys and values, the same parameter layout."""
    sa, sb = a.lora_state(), b.lora_state()
    assert sa.keys() == sb.keys()
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k
    assert [tuple(p.shape) for p in a.trainable_parameters()] == [tuple(p.shape) for p in b.trainable_parameters()]


def test_sd2_text_encoder_ends_at_the_penultimate_layer(tiny):
    """diffusers' SD2 text encoder has one layer fewer than OpenCLIP-H (from the single file and from the
    folder); the diffusers host still keeps a LoRA for that last layer, so its LoRA has ComfyUI's keys."""
    layers = tiny_models.WIDTHS["clip_h"][1]
    comfy_host, *diffusers_hosts = make_hosts(tiny["sd2"])
    assert comfy_host.clip.cond_stage_model.clip_h.num_layers == layers
    for h in diffusers_hosts:
        assert h.pipe.text_encoder.config.num_hidden_layers == layers - 1
        assert any(f"layers_{layers - 1}_self_attn" in k for k in h.lora_state())


def test_single_file_layout(tiny):
    """The checkpoints are in the original layouts diffusers' converters are written for."""
    from safetensors import safe_open

    with safe_open(str(tiny["sd2"]["checkpoint"]), "pt") as f:
        sd2 = set(f.keys())
    with safe_open(str(tiny["sdxl"]["checkpoint"]), "pt") as f:
        sdxl = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd2 and "v_pred" in sd2
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sdxl
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in sdxl
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl


def test_same_conditioning(family_hosts):
    family, (comfy_host, *diffusers_hosts) = family_hosts
    with torch.no_grad():
        ref = comfy_host.encode(PROMPTS + [""])
        for h in diffusers_hosts:
            out = h.encode(PROMPTS + [""])
            torch.testing.assert_close(out["cross_attn"], ref["cross_attn"], rtol=1e-5, atol=1e-5)
            if family == "sdxl":
                torch.testing.assert_close(out["pooled"], ref["pooled"], rtol=1e-5, atol=1e-5)
        # the LoRA matters (the comparison is not between two untouched encoders), on every output compared
        with comfy_host.lora_enabled(False):
            base = comfy_host.encode(PROMPTS)
    assert (base["cross_attn"] - ref["cross_attn"][:3]).abs().max() > 1e-3
    if family == "sdxl":
        assert (base["pooled"] - ref["pooled"][:3]).abs().max() > 1e-3
        width_l = comfy_host.clip.cond_stage_model.clip_l.transformer.text_model.final_layer_norm.weight.shape[0]
        for part in (slice(0, width_l), slice(width_l, None)):  # both encoders' halves carry the LoRA
            assert (base["cross_attn"][..., part] - ref["cross_attn"][:3, :, part]).abs().max() > 1e-3


def test_padding_follows_comfyui_not_the_tokenizer_config(tiny):
    """A pipeline whose SD2 / CLIP-G tokenizer names another pad token still gets ComfyUI's padding (id 0 after
    the end token for OpenCLIP-H / CLIP-G, the end token for CLIP-L): the padded positions go through the causal
    encoder and are part of the conditioning."""
    for family in FAMILIES:
        d = tiny[family]
        with torch.inference_mode():
            comfy_host = ComfyHost(d["model"], d["clip"], d["vae"], rank=4, alpha=4.0, seed=1)
        pipe = dhost.load_pipeline(d["checkpoint"], config=d["config"])
        last = pipe.tokenizer_2 if family == "sdxl" else pipe.tokenizer
        assert last.pad_token_id == 0  # as the real folders ship it
        last.pad_token = "<|endoftext|>"
        pipe.tokenizer.pad_token = "<|endoftext|>" if family == "sdxl" else "!"
        host = dhost.DiffusersHost(pipe, rank=4, alpha=4.0, seed=1)
        with torch.no_grad():
            ref, out = comfy_host.encode(PROMPTS), host.encode(PROMPTS)
        for k in ref.keys() & out.keys():
            torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)


def test_refiner_and_projectionless_pipelines_refused():
    from types import SimpleNamespace

    with pytest.raises(dhost.PipelineLoadError, match="refiner"):
        dhost.family_of(SimpleNamespace(text_encoder=None, text_encoder_2=SimpleNamespace(text_projection=None)))
    with pytest.raises(dhost.PipelineLoadError, match="CLIPTextModelWithProjection"):
        dhost.family_of(SimpleNamespace(text_encoder=SimpleNamespace(), text_encoder_2=SimpleNamespace()))


def _predict(host, x: torch.Tensor, t: torch.Tensor, guidance: float) -> torch.Tensor:
    with torch.no_grad():
        cond, uncond = host.encode(PROMPTS), host.encode([""])
        with host.predictor(cond, uncond, guidance) as predict:
            return predict(x, t)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_same_prediction_and_log_probs(family_hosts, guidance):
    family, hosts = family_hosts
    sched = ddim.ddim_schedule(hosts[0].alphas_cumprod, 5)
    h, w = SIZE[family]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, h // 8, w // 8, generator=g)
    noise = torch.randn(3, 4, h // 8, w // 8, generator=g)
    abar_t, abar_prev = sched.abar_t[1].expand(3), sched.abar_prev[1].expand(3)
    eps = [_predict(host, x, sched.timesteps[1].expand(3), guidance) for host in hosts]
    prev0, _, _, _ = ddim.ddim_step(x, eps[0], abar_t, abar_prev, 1.0, noise=noise)  # ComfyUI's sampled step
    # the log-prob each host gives that stored step (what training scores; sampling's own log-prob does not
    # depend on ε, since x_prev − μ = σ·noise)
    lps = [ddim.ddim_step(x, e, abar_t, abar_prev, 1.0, prev_sample=prev0)[1] for e in eps]
    assert eps[0].abs().mean() > 0.1
    for e, lp in zip(eps[1:], lps[1:]):
        torch.testing.assert_close(e, eps[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ddim.ddim_step(x, e, abar_t, abar_prev, 1.0, noise=noise)[0], prev0,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lp, lps[0], rtol=1e-5, atol=1e-4)
    # the scored log-prob does follow ε (so the comparison above can fail): the unguided ε scores differently
    if guidance != 1.0:
        other = ddim.ddim_step(x, _predict(hosts[1], x, sched.timesteps[1].expand(3), 1.0), abar_t, abar_prev, 1.0,
                               prev_sample=prev0)[1]
        assert (other - lps[0]).abs().max() > 1e-2


@pytest.mark.parametrize("family_hosts", ["sdxl"], indirect=True)
def test_sdxl_size_conditioning_matters(family_hosts, monkeypatch):
    """The parity above would not notice a wrong size conditioning if the U-Net ignored it: it does not."""
    _, hosts = family_hosts
    sched = ddim.ddim_schedule(hosts[0].alphas_cumprod, 5)
    x = torch.randn(3, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    t = sched.timesteps[1].expand(3)
    ref = _predict(hosts[0], x, t, 5.0)
    host = hosts[1]
    right = host._time_ids
    torch.testing.assert_close(_predict(host, x, t, 5.0), ref, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(host, "_time_ids", lambda b, hh, ww: right(b, ww, hh))  # height and width swapped
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_predict(host, x, t, 5.0), ref, rtol=1e-4, atol=1e-4)


def test_same_decoded_images(family_hosts):
    family, (comfy_host, *diffusers_hosts) = family_hosts
    h, w = SIZE[family]
    z = torch.randn(2, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(1))
    ref = comfy_host.decode(z).cpu()
    assert ref.shape == (2, h, w, 3) and ref.std() > 1e-2
    for host in diffusers_hosts:
        torch.testing.assert_close(host.decode(z).cpu(), ref, rtol=1e-4, atol=1e-4)


def _gradients(hosts: list, family: str) -> list[dict[str, torch.Tensor | None]]:
    h, w = SIZE[family]
    cfg = config.make_config("texforce", num_steps=3, timestep_fraction=1.0, images_per_epoch=2, images_per_prompt=1,
                             sample_batch_size=2, train_batch_size=2, gradient_accumulation_steps=1, height=h,
                             width=w, epochs=1, lora_rank=4, lora_alpha=4.0)
    return surrogate_gradients(hosts, cfg)


def surrogate_gradients(hosts: list, cfg) -> list[dict[str, torch.Tensor | None]]:
    """One surrogate backward through the same sampled chain (2 prompts, 3 steps) on each host; the LoRA gradients
    by parameter name (None where none reached it)."""
    grads = []
    for host in hosts:
        tr = loop.Trainer(host, lambda im, p: im.mean(dim=(1, 2, 3)), PROMPTS[:2], cfg)
        with torch.inference_mode(False):
            traj = tr.sample(PROMPTS[:2], seed=5)
            traj.advantages = torch.tensor([1.0, -1.0])
            with host.training(), torch.enable_grad():
                tr.optimizer.zero_grad()
                tr.backward_microbatch(traj, torch.arange(2), torch.tensor([[0, 1, 2], [2, 1, 0]]), 1.0)
        grads.append({name: None if p.grad is None else p.grad.detach().float().cpu().clone()
                      for name, p in zip(_param_names(host), host.trainable_parameters())})
    return grads


def _assert_same_gradients(grads: list[dict[str, torch.Tensor | None]]) -> None:
    ref = grads[0]
    norm = sum(float(g.norm()) for g in ref.values() if g is not None)
    assert norm > 0
    for other in grads[1:]:
        assert other.keys() == ref.keys()
        for k, g in ref.items():
            if g is None or other[k] is None:  # a layer after the one ComfyUI reads (SD2's last): no gradient
                assert all(x is None or not x.any() for x in (g, other[k])), k
                continue
            torch.testing.assert_close(other[k], g, rtol=2e-3, atol=1e-6 * norm)


def test_same_gradients(family_hosts):
    """One surrogate backward on each host: the LoRA gradients agree (same keys, same values)."""
    family, hosts = family_hosts
    grads = _gradients(hosts, family)
    _assert_same_gradients(grads)
    if family == "sd2":  # OpenCLIP-H's last layer comes after the one read: its LoRA gets no gradient on any host
        last = f"layers.{tiny_models.WIDTHS['clip_h'][1] - 1}."
        for g in grads:
            assert {k for k, v in g.items() if v is None} == {k for k in g if last in k}


@pytest.mark.parametrize("encoder", ["clip_l", "clip_g"])
def test_sdxl_same_gradients_per_encoder(tiny, encoder):
    """Training CLIP-L alone (te1) or CLIP-G alone (te2): same keys, same gradients on both hosts, and only the
    chosen encoder's LoRA exists."""
    hosts = make_hosts(tiny["sdxl"], [encoder])
    load_random_lora(hosts)
    grads = _gradients(hosts, "sdxl")
    slot = {"clip_l": "te1", "clip_g": "te2"}[encoder]
    assert {k.split(":")[1] for k in grads[0]} == {slot}
    _assert_same_gradients(grads)


def _param_names(host) -> list[str]:
    keys = host.lora.keys if hasattr(host, "lora") else host.keys
    return [f"down:{k[0]}:{k[1]}" for k in keys] + [f"up:{k[0]}:{k[1]}" for k in keys]
