"""SD 2.x on the ComfyUI host: OpenCLIP-H, v-prediction converted to ε exactly, the DDIM log-prob of every
sampled step against the closed-form Gaussian, and the family's native resolution as the node's default."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import pack, tiny_models
from test_family_training import PROMPTS, brightness, build, loop, randomise_lora, small_config

train_node = importlib.import_module(f"{pack.__name__}.nodes.train_node")
GUIDANCE = 5.0


def scaled_linear_abar() -> torch.Tensor:
    """ᾱ of Stable Diffusion written out: betas = linspace(√0.00085, √0.012, 1000)², ᾱ = Π(1 − β)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def raw_unet(model, x: torch.Tensor, t: torch.Tensor, cross_attn: torch.Tensor) -> torch.Tensor:
    """The U-Net's own output (v for a v-prediction model) for the VP latent x at integer timesteps t."""
    return model.model.diffusion_model(x, t.float(), context=cross_attn.expand(x.shape[0], -1, -1))


def eps_by_hand(model, x, t, cond, uncond, guidance=GUIDANCE, as_if_eps=False):
    """ε = √ᾱ·v + √(1−ᾱ)·x per branch, then ε̂ = ε_u + w(ε_c − ε_u), in float64. as_if_eps: the wrong reading."""
    abar = scaled_linear_abar()[t].reshape(-1, 1, 1, 1)
    x64 = x.double()
    eps = []
    for c in (cond, uncond):
        v = raw_unet(model, x, t, c["cross_attn"]).double()
        eps.append(v if as_if_eps else abar.sqrt() * v + (1 - abar).sqrt() * x64)
    e_c, e_u = eps
    return e_u + guidance * (e_c - e_u)


def test_the_tiny_sd2_model_is_v_prediction_on_the_sd_schedule():
    host, model, clip, _ = build("sd2")
    import comfy.model_sampling

    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert host.encoders == ["clip_h"] and host.family == "sd2"
    assert torch.allclose(host.alphas_cumprod.double(), scaled_linear_abar(), atol=1e-6, rtol=0)


def test_v_prediction_is_converted_to_eps_exactly():
    host, model, *_ = build("sd2")
    randomise_lora(host)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([981, 500, 21])
    with torch.inference_mode(False), torch.no_grad():
        cond, uncond = host.encode(PROMPTS[:3]), host.encode([""])
        with host.predictor(cond, uncond, GUIDANCE) as predict:
            eps = predict(x, t).double()
        expected = eps_by_hand(model, x, t, cond, uncond)
        misread = eps_by_hand(model, x, t, cond, uncond, as_if_eps=True)
    assert (eps - expected).abs().max() < 1e-5, float((eps - expected).abs().max())
    assert (misread - expected).abs().max() > 0.1  # reading v as ε would be far off: the test can tell


def test_every_sampled_step_has_the_closed_form_gaussian_log_prob():
    """Sample with the host, then re-derive each step by hand from the raw v output: x̂0, σ_t, μ, and
    log N(x_prev; μ, σ_t²) averaged over C,H,W must equal the stored log-probs, and the stored x_prev must be
    μ + σ_t·z with z standard normal."""
    host, model, *_ = build("sd2")
    randomise_lora(host)
    cfg = small_config(num_steps=3, eta=1.0, guidance=GUIDANCE)
    tr = loop.Trainer(host, brightness, PROMPTS, cfg)
    with torch.inference_mode(False), torch.no_grad():
        traj = tr.sample(PROMPTS, seed=3)
        cond, uncond = host.encode(PROMPTS), host.encode([""])
    abar = scaled_linear_abar()
    timesteps = [667, 334, 1]  # diffusers' DDIM "leading" spacing with steps_offset 1, for 3 steps
    assert tr.schedule.timesteps.tolist() == timesteps
    z_all = []
    for i, t in enumerate(timesteps):
        x, x_prev = traj.latents[:, i], traj.latents[:, i + 1].double()
        a_t, a_p = abar[t], (abar[t - 333] if t - 333 >= 0 else abar[0])
        with torch.inference_mode(False), torch.no_grad():
            eps = eps_by_hand(model, x, torch.full((4,), t), cond, uncond)
        x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = cfg.eta * ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt()
        mu = a_p.sqrt() * x0 + (1 - a_p - sigma ** 2).sqrt() * eps
        log_prob = torch.distributions.Normal(mu, sigma).log_prob(x_prev).mean(dim=(1, 2, 3))
        assert torch.allclose(traj.log_probs[:, i].double(), log_prob, atol=1e-4, rtol=0), \
            (i, traj.log_probs[:, i], log_prob)
        z_all.append(((x_prev - mu) / sigma).flatten())
    z = torch.cat(z_all)
    assert abs(float(z.mean())) < 0.15 and 0.85 < float(z.std()) < 1.15, (float(z.mean()), float(z.std()))


@pytest.mark.parametrize("family,v_prediction,size", [
    ("sd1", False, 512), ("sd1", True, 512), ("sd2", True, 768), ("sd2", False, 512), ("sdxl", False, 1024),
    ("sd3", False, 1024), ("flux", False, 1024),
])
def test_auto_resolution_follows_the_family(family, v_prediction, size):
    with torch.inference_mode():
        model = (tiny_models.tiny_transformer(family, 0) if family in tiny_models.T5_WIDTHS else
                 tiny_models.tiny_unet(family, 0, v_prediction=v_prediction))
    assert train_node.native_resolution(model) == size


def test_resolution_widgets_default_to_auto_and_say_what_auto_means():
    schema = train_node.TexForceTrain.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    for name in ("width", "height"):
        assert inputs[name].default == 0 and inputs[name].min == 0
    tip = inputs["width"].tooltip
    assert "0 = auto" in tip and all(s in tip for s in ("512 for SD 1.x", "768 for SD 2.x v-prediction",
                                                        "1024 for SDXL, SD 3.x and Flux"))
    enc = inputs["text_encoders"]
    assert enc.options == ["all", "clip_l", "clip_g", "t5xxl", "clip_l+clip_g", "clip_l+t5xxl", "clip_g+t5xxl"]
    assert enc.default == "all" and enc.optional
