"""Training on a flow-matching MODEL in ComfyUI: the tiny SD1 U-Net under ComfyUI's own ModelSamplingSD3 patch
(rectified-flow sampling, velocity prediction, shift 3), as a user's graph would give it to TexForce Train.

The host must notice the flow model (no DDIM on it), step with Flow-GRPO's SDE on the times ComfyUI's scheduler
gives, and reproduce ComfyUI's own Euler sampler exactly when no step takes noise. SD 3.x and Flux themselves (their
transformers, T5, Flux's guidance) are in test_flow_families_comfy.py.
"""
from __future__ import annotations

import importlib

import torch

from conftest import pack, tiny_models
from test_train_comfy import PROMPTS, ComfyHost, brightness, config, loop

sampling = importlib.import_module(f"{pack.__name__}.training.sampling")
flow_step = importlib.import_module(f"{pack.__name__}.training.flow_step")


def flow_models(shift: float = 3.0):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    with torch.inference_mode():
        model, clip, vae = tiny_models.tiny_model(0), tiny_models.tiny_clip("sd1", 0), tiny_models.tiny_vae(0)
        (flow_model,) = ModelSamplingSD3().patch(model, shift)
    return flow_model, clip, vae


def small_config(**kw):
    base = dict(num_steps=4, timestep_fraction=1.0, images_per_epoch=4, images_per_prompt=1, sample_batch_size=4,
                train_batch_size=2, gradient_accumulation_steps=2, height=32, width=32, epochs=2, lora_rank=4,
                lora_alpha=4.0, eta=0.7)
    return config.make_config(kw.pop("preset", "texforce"), **{**base, **kw})


def test_a_flow_model_gets_the_flow_schedule_of_comfys_scheduler():
    import comfy.samplers

    model, clip, vae = flow_models()
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae, rank=4, alpha=4.0)
    assert host.flow and host.alphas_cumprod is None
    tr = loop.Trainer(host, brightness, PROMPTS, small_config())
    assert isinstance(tr.schedule, flow_step.FlowSchedule) and len(tr.schedule) == 4
    expected = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4).float()
    assert torch.equal(tr.schedule.times, expected)
    assert tr.schedule.times[0] == 1 and tr.schedule.times[-1] == 0
    # the unpatched model is a VP model and keeps DDIM
    with torch.inference_mode():
        vp = ComfyHost(tiny_models.tiny_model(0), clip, vae, rank=4, alpha=4.0)
    assert not vp.flow and type(loop.Trainer(vp, brightness, PROMPTS, small_config()).schedule).__name__ == "DDIMSchedule"


def test_without_noise_the_chain_is_comfys_own_euler_sampler():
    """Every step deterministic (branch sampling's mask all off): the pack's chain from the same start noise must
    give ComfyUI's KSampler `euler` / `simple` latents on this MODEL."""
    import comfy.sample

    model, clip, vae = flow_models()
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae, rank=4, alpha=4.0)
    cfg = small_config(guidance=3.0)
    tr = loop.Trainer(host, brightness, PROMPTS, cfg)
    prompts = [PROMPTS[0]] * 2  # ComfyUI's conditioning is one prompt for the batch
    seed = 123
    with torch.inference_mode(False), torch.no_grad():
        traj, _ = sampling.sample(host, cfg, tr._sched, prompts, seed, brightness, lambda: None,
                                  stochastic=torch.zeros(2, 4, dtype=torch.bool))
    shape = host.latent_shape(32, 32)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(2)])

    def cond(text: str) -> list:
        c, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[c, {"pooled_output": pooled}]]

    with torch.inference_mode():
        theirs = comfy.sample.sample(model, noise, 4, 3.0, "euler", "simple", cond(PROMPTS[0]),
                                     cond(cfg.negative_prompt), torch.zeros_like(noise), denoise=1.0, seed=seed)
    ours = model.model.process_latent_out(traj.latents[:, -1])
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)
    assert (traj.log_probs == 0).all()  # no step took noise: nothing to train on


def test_flow_chain_ratio_is_exactly_one_and_training_moves_the_lora():
    model, clip, vae = flow_models()
    with torch.inference_mode():
        host = ComfyHost(model, clip, vae, rank=4, alpha=4.0)
    for loss in ("ppo", "rwr"):
        cfg = small_config(loss=loss, lr=1e-2)
        tr = loop.Trainer(host, brightness, PROMPTS, cfg)
        with torch.inference_mode(False), torch.no_grad():
            traj, _ = sampling.sample(host, cfg, tr._sched, PROMPTS, 7, brightness, lambda: None)
            again = sampling.chain_log_probs(host, cfg, tr._sched, traj)
        assert torch.isfinite(traj.log_probs).all() and (traj.log_probs != 0).all()
        assert torch.equal(again, traj.log_probs)
        before = [p.detach().clone() for p in host.trainable_parameters()]
        with torch.inference_mode(False):
            history = tr.run()
        assert len(history) == 2 and all(torch.isfinite(torch.tensor(h.loss)) for h in history)
        moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(host.trainable_parameters(), before))
        assert moved > 0, loss
