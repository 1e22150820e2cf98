"""SDXL on the ComfyUI host: the pooled output of CLIP-G and the size conditioning reach the U-Net exactly as
ComfyUI's SDXL model builds them (and are differentiable w.r.t. CLIP-G's LoRA), the te1/te2 choice, and files
that A1111/Forge and ComfyUI's stock loader read as SDXL LoRAs."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import pack, tiny_models
from lora_builders import encode
from test_family_training import PROMPTS, brightness, build, loop, randomise_lora, small_config
from test_lora_loading import assert_same, run_loader, stock_lora_loader
from test_train_comfy import assert_surrogate_gradient

HEIGHT, WIDTH = 32, 48  # not square, so the order of SDXL's size embeddings is checked too


def sinusoid(values: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Transformer-style timestep embedding [cos | sin] with max period 10000, written out here."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sdxl_adm(pooled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SDXL's label input: CLIP-G pooled ⊕ embeddings of (height, width, crop_h, crop_w, target_h, target_w)."""
    sizes = torch.tensor([height, width, 0, 0, height, width])
    return torch.cat([pooled, sinusoid(sizes).flatten().expand(pooled.shape[0], -1)], dim=1)


def by_hand_eps(model, x, t, cond, uncond, guidance, pooled_scale=1.0, size=(HEIGHT, WIDTH)):
    """ε̂ from the raw U-Net (an eps model takes the VP latent and the integer timestep), cfg done here."""
    unet = model.model.diffusion_model
    b = x.shape[0]
    outs = []
    for c in (cond, uncond):
        ctx, pooled = c["cross_attn"].expand(b, -1, -1), c["pooled"].expand(b, -1)
        outs.append(unet(x, t.float(), context=ctx, y=sdxl_adm(pooled * pooled_scale, *size)))
    e_c, e_u = outs
    return e_u + guidance * (e_c - e_u)


def test_pooled_and_size_conditioning_reach_the_unet_as_comfys_sdxl_builds_them():
    host, model, *_ = build("sdxl")
    randomise_lora(host)
    assert type(model.model).__name__ == "SDXL" and model.model.adm_channels == tiny_models.SDXL_ADM_CHANNELS
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, HEIGHT // 8, WIDTH // 8, generator=g)
    t = torch.tensor([600, 250])
    with torch.inference_mode(False), torch.no_grad():
        cond, uncond = host.encode(PROMPTS[:2]), host.encode([""])
        assert cond["cross_attn"].shape == (2, 77, 32 + 48) and cond["pooled"].shape == (2, 48)
        with host.predictor(cond, uncond, 5.0) as predict:
            eps = predict(x, t)
        expected = by_hand_eps(model, x, t, cond, uncond, 5.0)
        no_pooled = by_hand_eps(model, x, t, cond, uncond, 5.0, pooled_scale=0.0)
        size_swapped = by_hand_eps(model, x, t, cond, uncond, 5.0, size=(WIDTH, HEIGHT))
    # x is unit-variance: 1e-5 is fp32 round-off of the VP ↔ k-diffusion conversions, amplified by cfg 5
    assert (eps - expected).abs().max() < 1e-5, float((eps - expected).abs().max())
    # not vacuous: without the pooled output, or with height and width swapped, ε̂ moves far beyond the tolerance
    assert (no_pooled - expected).abs().max() > 1e-4 and (size_swapped - expected).abs().max() > 1e-4


def test_clip_g_lora_gradient_equals_finite_differences_of_the_surrogate():
    """The whole CLIP-G training path (LoRA on te2 → concatenated cross-attention and pooled/size conditioning →
    U-Net through comfy's sampling function → fp32 log-prob), against central differences."""
    host, *_ = build("sdxl", ["clip_g"])
    randomise_lora(host)
    tr = loop.Trainer(host, brightness, PROMPTS, small_config(loss="sf", height=HEIGHT, width=WIDTH))
    assert_surrogate_gradient(host, tr, eps=1e-3)


def test_the_pooled_conditioning_gradient_equals_finite_differences():
    """d ε̂ / d pooled through SDXL's label embedding, as the trainer back-propagates it (host.training()),
    against central differences along the gradient's own direction (where the signal is largest)."""
    host, *_ = build("sdxl", ["clip_g"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, HEIGHT // 8, WIDTH // 8, generator=g)
    t, w = torch.tensor([600, 250]), torch.randn(2, 4, HEIGHT // 8, WIDTH // 8, generator=g, dtype=torch.float64)
    with torch.inference_mode(False), torch.no_grad():
        cond, uncond = host.encode(PROMPTS[:2]), host.encode([""])

    def f(pooled: torch.Tensor) -> torch.Tensor:
        with host.predictor({**cond, "pooled": pooled}, uncond, 5.0) as predict:
            return (predict(x, t).double() * w).sum()

    with torch.inference_mode(False):
        leaf = cond["pooled"].clone().requires_grad_(True)
        with host.training(), torch.enable_grad():
            f(leaf).backward()
        grad = leaf.grad
        u = grad / grad.norm()
        with torch.no_grad():
            eps = 3e-3  # central differences: 1e-2 is 2.5% off from curvature (measured), 3e-3 0.9%
            numeric = float(f(cond["pooled"] + eps * u) - f(cond["pooled"] - eps * u)) / (2 * eps)
    assert float(grad.norm()) > 1e-3, "the pooled output must steer ε̂"
    assert numeric == pytest.approx(float(grad.norm()), rel=0.02), (numeric, float(grad.norm()))


@pytest.mark.parametrize("family,encoders,message", [
    ("sd1", ["clip_g"], r"cannot train CLIP-G: this CLIP is SD 1\.x \(CLIP-L\), which has CLIP-L only"),
    ("sd2", ["clip_l"], r"cannot train CLIP-L: this CLIP is SD 2\.x \(OpenCLIP-H\), which has OpenCLIP-H only"),
    ("sd2", ["clip_g", "clip_l"], r"cannot train CLIP-G \+ CLIP-L: this CLIP is SD 2\.x"),
    ("sdxl", [], r"cannot train no encoder: this CLIP is SDXL \(CLIP-L \+ CLIP-G\)"),
])
def test_an_encoder_the_clip_lacks_is_refused(family, encoders, message):
    with pytest.raises(ValueError, match=message):
        build(family, encoders, learnable=False)


def test_clip_l_on_sd1_is_its_own_encoder():
    host, *_ = build("sd1", ["clip_l"], learnable=False)
    assert host.encoders == ["clip_l"] and {slot for slot, _ in host.lora.keys} == {"te"}


@pytest.mark.parametrize("encoders", [["clip_l"], ["clip_g"]])
def test_a_single_encoder_file_loads_in_our_loader_like_the_stock_one(encoders, loras_dir):
    """A te1-only or te2-only SDXL file (what text_encoders = clip_l / clip_g writes) goes to that encoder only."""
    host, _, clip, _ = build("sdxl", encoders, learnable=False)
    randomise_lora(host, std=0.3)
    path = pack.training.lora.save_kohya(host.lora.to_lora_set("one"), loras_dir / "one.safetensors", family="sdxl")
    ours, _, report = run_loader(clip, lora_1=path.name, strength_1=0.7)
    _, stock = stock_lora_loader(clip, path.name, 0.7)
    with torch.inference_mode():
        assert_same(encode(ours), encode(stock), tol=1e-6)
    enc = encoders[0]
    other = {"clip_l": "clip_g", "clip_g": "clip_l"}[enc]
    assert f"{enc} {len(host.lora.keys)} modules" in report and other not in report.split("text encoders:")[1]
    assert "; for SDXL (CLIP-L + CLIP-G)" in report
