"""Parity between the ComfyUI host and the diffusers host on the same tiny weights.

The tiny SD1 model is built from real comfy classes, written by ComfyUI's own save_checkpoint as an
original single-file checkpoint, and read by diffusers' single-file loader (and again from the diffusers
folder it saves), so both real loading paths are what is compared.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import pack
from diffusers_builders import write_tiny_sd1
from test_headless_families import _assert_same_gradients, _gradients

ComfyHost = importlib.import_module(f"{pack.__name__}.training.hosts.comfy").ComfyHost
dhost = importlib.import_module(f"{pack.__name__}.training.hosts.diffusers")
ddim = importlib.import_module(f"{pack.__name__}.training.ddim")
loop = importlib.import_module(f"{pack.__name__}.training.loop")
config = importlib.import_module(f"{pack.__name__}.training.config")

PROMPTS = ["a red apple", "a blue car", "a red apple"]


@pytest.fixture(scope="module", params=[False, True], ids=["eps", "v_prediction"])
def pair(request, tmp_path_factory):
    """(comfy host, diffusers host from the single file, diffusers host from the saved folder) with one LoRA."""
    root = tmp_path_factory.mktemp("tiny_sd1")
    d = write_tiny_sd1(root, learnable=True, v_prediction=request.param)
    pipe = dhost.load_pipeline(d["checkpoint"], config=d["config"])
    pipe.save_pretrained(root / "folder")
    folder_pipe = dhost.load_pipeline(root / "folder")
    with torch.inference_mode():
        comfy_host = ComfyHost(d["model"], d["clip"], d["vae"], rank=4, alpha=4.0, seed=7)
    hosts = [comfy_host, dhost.DiffusersHost(pipe, rank=4, alpha=4.0, seed=7),
             dhost.DiffusersHost(folder_pipe, rank=4, alpha=4.0, seed=7)]
    # a non-zero LoRA, the same on all three (through each host's own state loading)
    g = torch.Generator().manual_seed(3)
    state = {k: (torch.randn(v.shape, generator=g) * 0.2 if "lora_up" in k else v)
             for k, v in hosts[1].lora_state().items()}
    for h in hosts:
        with torch.inference_mode(False):
            h.load_lora_state(state)
    return hosts


def test_same_schedule_and_initial_lora(tmp_path):
    d = write_tiny_sd1(tmp_path)
    with torch.inference_mode():
        comfy_host = ComfyHost(d["model"], d["clip"], d["vae"], rank=4, alpha=4.0, seed=11)
    diff_host = dhost.DiffusersHost(dhost.load_pipeline(d["checkpoint"], config=d["config"]), rank=4, alpha=4.0, seed=11)
    assert diff_host.family == "sd1"
    torch.testing.assert_close(diff_host.alphas_cumprod, comfy_host.alphas_cumprod, rtol=1e-6, atol=1e-7)
    a, b = comfy_host.lora_state(), diff_host.lora_state()
    assert a.keys() == b.keys() and len(a) == 3 * 4 * 3  # 3 layers × q/k/v/out × down/up/alpha
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_conditioning(pair):
    comfy_host, *diffusers_hosts = pair
    with torch.no_grad():
        ref = comfy_host.encode(PROMPTS + [""])["cross_attn"]
        for h in diffusers_hosts:
            torch.testing.assert_close(h.encode(PROMPTS + [""])["cross_attn"], ref, rtol=1e-5, atol=1e-5)
        # and the LoRA matters (the comparison is not between two untouched encoders)
        with comfy_host.lora_enabled(False):
            base = comfy_host.encode(PROMPTS)["cross_attn"]
        assert (base - ref[:3]).abs().max() > 1e-3


def test_same_prediction_and_log_probs(pair):
    comfy_host, *diffusers_hosts = pair
    sched = ddim.ddim_schedule(comfy_host.alphas_cumprod, 5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, 4, generator=g)
    noise = torch.randn(3, 4, 4, 4, generator=g)
    step = (sched.abar_t[1].expand(3), sched.abar_prev[1].expand(3), 1.0)
    results = []
    with torch.no_grad():
        for h in pair:
            cond, uncond = h.encode(PROMPTS), h.encode([""])
            with h.predictor(cond, uncond, 5.0) as predict:
                results.append(predict(x, sched.timesteps[1].expand(3)))
        # the step the ComfyUI host sampled, scored under each host's ε: what training computes
        prev0, lp0, _, _ = ddim.ddim_step(x, results[0], *step, noise=noise)
        # (the sampled step's own log-prob does not depend on ε; a step from other noise does)
        prev_other = ddim.ddim_step(x, results[0], *step, noise=torch.randn(x.shape, generator=g))[0]
        lp_other = ddim.ddim_step(x, results[0], *step, prev_sample=prev_other)[1]
    assert results[0].abs().mean() > 0.1
    for eps in results[1:]:
        torch.testing.assert_close(eps, results[0], rtol=1e-4, atol=1e-4)
        prev, _, _, _ = ddim.ddim_step(x, eps, *step, noise=noise)
        torch.testing.assert_close(prev, prev0, rtol=1e-4, atol=1e-4)
        for target, ref in ((prev0, lp0), (prev_other, lp_other)):
            lp = ddim.ddim_step(x, eps, *step, prev_sample=target)[1]
            torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-4)


def test_same_decoded_images(pair):
    comfy_host, *diffusers_hosts = pair
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ref = comfy_host.decode(z).cpu()
    assert ref.shape == (2, 32, 32, 3)
    for h in diffusers_hosts:
        torch.testing.assert_close(h.decode(z).cpu(), ref, rtol=1e-4, atol=1e-4)


def test_same_gradients(pair):
    """One surrogate backward on each host: the LoRA gradients agree (same keys, same values)."""
    _assert_same_gradients(_gradients(pair, "sd1"))
