"""Training on the ComfyUI host: gradients, ratio, surrogate, untouched inputs, stock-loader parity, learning.

Models are built inside torch.inference_mode(), as ComfyUI's nodes run, so their weights are inference
tensors exactly as in the real server (the trap DESIGN.md §5 describes).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from conftest import pack, tiny_models
from lora_builders import encode
from test_lora_loading import assert_same, stock_lora_loader

ComfyHost = importlib.import_module(f"{pack.__name__}.training.hosts.comfy").ComfyHost
loop = importlib.import_module(f"{pack.__name__}.training.loop")
update = importlib.import_module(f"{pack.__name__}.training.update")
config = importlib.import_module(f"{pack.__name__}.training.config")
PROMPTS = ["a red apple", "a blue car", "a green tree", "a yellow sun"]


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A smooth reward: mean pixel value."""
    return images.mean(dim=(1, 2, 3))


def build(seed: int = 0, learnable: bool = False, rank: int = 4):
    """(host, model, clip, vae) made under inference mode. learnable: the tiny v-prediction model whose text
    pathway controls the image (fan-in init, cross-attention ×10, output ×20; see tiny_models)."""
    with torch.inference_mode():
        if learnable:
            model = tiny_models.tiny_model(0, True, v_prediction=True, output_gain=20)
            clip, vae = tiny_models.tiny_clip("sd1", 0, True), tiny_models.tiny_vae(0, True)
        else:
            model, clip, vae = tiny_models.tiny_model(0), tiny_models.tiny_clip("sd1", 0), tiny_models.tiny_vae(0)
        host = ComfyHost(model, clip, vae, rank=rank, alpha=float(rank), seed=seed)
    return host, model, clip, vae


def small_config(**kw):
    base = dict(num_steps=3, timestep_fraction=1.0, images_per_epoch=4, images_per_prompt=1, sample_batch_size=4,
                train_batch_size=2, gradient_accumulation_steps=2, height=32, width=32, epochs=3, lora_rank=4,
                lora_alpha=4.0)
    return config.make_config(kw.pop("preset", "texforce"), **{**base, **kw})


def randomise_lora(host, std: float = 0.1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        for p in host.lora.up:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_gradient(host, cfg) -> torch.Tensor:
    """The LoRA's gradient of one micro-batch (4 prompts, fixed advantages, all 3 timesteps), flattened."""
    randomise_lora(host)
    tr = loop.Trainer(host, brightness, PROMPTS, cfg)
    with torch.inference_mode(False):
        traj = tr.sample(PROMPTS, seed=11)
        traj.advantages = torch.tensor([1.0, -0.3, 0.7, -1.2])
        with host.training(), torch.enable_grad():
            tr.backward_microbatch(traj, torch.arange(4), torch.arange(3).repeat(4, 1), 1.0)
    return torch.cat([p.grad.flatten() for p in host.trainable_parameters()])


def test_one_backward_reaches_only_the_lora():
    host, model, clip, vae = build()
    randomise_lora(host)
    tr = loop.Trainer(host, brightness, PROMPTS, small_config())
    with torch.inference_mode(False):
        traj = tr.sample(PROMPTS, seed=3)
        traj.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
        with host.training(), torch.enable_grad():
            tr.backward_microbatch(traj, torch.arange(4), torch.arange(3).repeat(4, 1), 1.0)
    grads = [p.grad for p in host.trainable_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    frozen = [*model.model.parameters(), *clip.cond_stage_model.parameters(), *vae.first_stage_model.parameters()]
    assert all(p.grad is None for p in frozen)


def assert_surrogate_gradient(host, tr, eps: float) -> None:
    """One score-function backward on a fixed batch equals central differences of the surrogate Σ A·log p
    along a random direction of the LoRA parameters."""
    with torch.inference_mode(False):
        traj = tr.sample(PROMPTS, seed=5)
        traj.advantages = torch.tensor([1.0, -0.5, 0.3, -0.8])
        with host.training(), torch.enable_grad():
            tr.backward_microbatch(traj, torch.arange(4), torch.arange(3).repeat(4, 1), 1.0 / 3)
        params = host.trainable_parameters()
        g = torch.Generator().manual_seed(2)
        direction = [torch.randn(p.shape, generator=g) for p in params]
        analytic = -sum(float((p.grad * d).sum()) for p, d in zip(params, direction))  # SF loss = −mean(A·log p)

        def surrogate() -> float:
            return float((traj.advantages.double()[:, None] * tr.log_probs(traj).double()).mean())

        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
            plus = surrogate()
            for p, d in zip(params, direction):
                p.sub_(2 * eps * d)
            minus = surrogate()
    numeric = (plus - minus) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=0.05), (analytic, numeric)


def test_gradient_equals_finite_differences_of_the_surrogate():
    """The whole ComfyUI gradient path (LoRA wrappers, CLIP, sampling_function, U-Net, fp32 log-prob)."""
    host, *_ = build(learnable=True)
    randomise_lora(host)
    tr = loop.Trainer(host, brightness, PROMPTS, small_config(loss="sf", train_batch_size=4,
                                                             gradient_accumulation_steps=1))
    assert_surrogate_gradient(host, tr, eps=3e-5)


def assert_ratio_one_and_update_raises_surrogate(host, tr) -> None:
    """Re-scoring a sampled trajectory gives its stored log-probs exactly (ratio 1 before the update), and one
    PPO update raises Σ A·Δlog p."""
    with torch.inference_mode(False):
        traj = tr.sample(PROMPTS, seed=7)
        traj.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
        before = tr.log_probs(traj)
        assert torch.equal(before, traj.log_probs), "re-scoring the stored trajectory must give the same log-probs"
        with host.training(), torch.enable_grad():
            info = tr.train_on(traj)
        after = tr.log_probs(traj)
    assert info.steps == 1 and max(float(e) for e in info.ratio_errors) == 0.0
    gain = float((traj.advantages[:, None] * (after - before)).sum())
    assert gain > 0, gain


def test_ratio_is_exactly_one_and_a_ppo_update_raises_the_surrogate():
    host, *_ = build(learnable=True)
    randomise_lora(host, std=0.05)
    cfg = small_config(lr=1e-3, train_batch_size=4, gradient_accumulation_steps=1, clip_range=10.0)
    assert_ratio_one_and_update_raises_surrogate(host, loop.Trainer(host, brightness, PROMPTS, cfg))


def test_encode_once_gives_the_same_gradient_as_reencoding_every_timestep():
    grads = []
    for once in (True, False):
        host, *_ = build(learnable=True)
        grads.append(lora_gradient(host, small_config(encode_once_per_microbatch=once)))
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-6


def step_gradient(cfg, once_per_step: bool) -> torch.Tensor:
    """The LoRA's gradient of one optimizer step of 9 samples (4 prompts twice, one prompt over 77 tokens) in
    micro-batches of 3, through backward_step (the encoder once per step) or micro-batch by micro-batch, the same
    micro-batches in both: the step's samples in prompt order (update.by_prompt) are a a b | b L c | c d d, so the
    middle one takes a one-chunk row encoded before it beside the two-chunk prompt L."""
    host, *_ = build(learnable=True)
    randomise_lora(host)
    prompts = [p for p in PROMPTS for _ in range(2)] + [" ".join(["a small red apple on a wooden table"] * 12)]
    tr = loop.Trainer(host, brightness, prompts, cfg)
    idx = torch.tensor([0, 2, 8, 4, 6, 1, 3, 5, 7])
    cols = torch.rand(9, 3, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    with torch.inference_mode(False):
        traj = tr.sample(prompts, seed=11)
        traj.advantages = torch.linspace(-1.2, 1.0, 9)
        with host.training(), torch.enable_grad():
            if once_per_step:
                tr.backward_step(traj, idx, cols)
            else:
                idx, cols = update.by_prompt(traj.prompts, idx, cols)
                for i, c in zip(idx.split(3), cols.split(3)):
                    tr.backward_microbatch(traj, i, c, len(i) / (9 * 3))
    return torch.cat([p.grad.flatten() for p in host.trainable_parameters()])


@pytest.mark.parametrize("kl_weight", [0.0, 0.05])
def test_encoding_once_per_optimizer_step_gives_the_per_microbatch_gradient(kl_weight):
    """With accumulation (3 micro-batches, a prompt shared by two of them, rows of one- and two-chunk prompts
    encoded apart in one micro-batch) and with DPOK's reference encoded once per step too. (Against micro-batches
    in another order, with L padding different partners to 154 tokens, the difference is float rounding:
    1.4e-5 measured.)"""
    cfg = small_config(images_per_epoch=9, sample_batch_size=9, images_per_prompt=1, train_batch_size=3,
                       gradient_accumulation_steps=3, kl_weight=kl_weight)
    step, micro = step_gradient(cfg, True), step_gradient(cfg, False)
    rel = ((step - micro).norm() / micro.norm()).item()
    assert micro.norm() > 0 and rel < 1e-5, rel


def test_training_leaves_the_users_clip_and_model_bit_identical_and_stock_loader_matches(tmp_path, loras_dir):
    host, model, clip, vae = build()
    with torch.inference_mode():
        cond_before = encode(clip)
    params_before = [(n, p) for n, p in model.model.named_parameters()]
    cfg = small_config(epochs=1, lr=1e-2)
    loop.Trainer(host, brightness, PROMPTS, cfg).run(1)
    # the U-Net's parameters were aliased for the training pass only: the very same tensors are back
    assert all(p is q and n == m for (n, p), (m, q) in zip(params_before, model.model.named_parameters()))
    with torch.inference_mode():
        assert_same(encode(clip), cond_before, tol=0.0)
    assert not clip.patcher.patches and not model.patches and not model.weight_wrapper_patches
    assert not clip.patcher.weight_wrapper_patches
    # The file we write, loaded by ComfyUI's stock LoraLoader, reproduces the conditioning the trainer used.
    path = pack.training.lora.save_kohya(host.lora.to_lora_set("trained"), loras_dir / "trained.safetensors",
                                         family="sd1")
    with torch.inference_mode(False), torch.no_grad():
        trainer_cond = host.encode(["a photo of a cat wearing a hat"])["cross_attn"]
    assert not torch.allclose(trainer_cond, cond_before[0], atol=1e-4), "training must have changed the LoRA"
    _, stock = stock_lora_loader(clip, path.name, 1.0)
    with torch.inference_mode():
        assert_same((encode(stock)[0],), (trainer_cond,), tol=1e-5)


@pytest.mark.parametrize("overrides", [
    {"preset": "ddpo", "advantage": "per_prompt", "stat_min_count": 2, "stat_buffer_size": 4},
    {"preset": "texforce", "loss": "sf", "advantage": "batch", "gradient_accumulation_steps": 2},
    {"preset": "dpok", "advantage": "group", "images_per_prompt": 2},
])
def test_variants_run_on_the_comfy_host(overrides):
    host, *_ = build()
    stats = loop.Trainer(host, brightness, PROMPTS, small_config(epochs=2, **overrides)).run(2)
    assert len(stats) == 2 and all(torch.isfinite(torch.tensor([s.reward_mean, s.grad_norm, s.loss])).all()
                                   for s in stats)
    if overrides["preset"] == "dpok":
        assert stats[-1].kl > 0


def test_resume_on_the_comfy_host_gives_the_same_lora(tmp_path):
    def final_lora(stops: list[int]):
        ckpt = tmp_path / f"ckpt_{len(stops)}.pt"
        for target in stops:
            host, *_ = build(seed=4)
            loop.Trainer(host, brightness, PROMPTS, small_config(epochs=3, lr=1e-2), checkpoint_path=ckpt).run(target)
        return torch.cat([p.detach().flatten() for p in host.trainable_parameters()])

    assert torch.equal(final_lora([3]), final_lora([2, 3]))


def test_the_learning_model_lets_the_prompt_control_the_image():
    """What build(learnable=True) buys: with the reference N(0, 0.02) weights two prompts give the same image
    (same noise) to ~1e-6; the learning model's images differ visibly between prompts."""
    diffs = {}
    for learnable in (False, True):
        host, *_ = build(learnable=learnable)
        tr = loop.Trainer(host, brightness, PROMPTS, small_config())
        with torch.inference_mode(False):
            a = tr.generate(["a red apple"] * 4, seed=9)
            b = tr.generate(["a blue car"] * 4, seed=9)
        diffs[learnable] = float((a - b).abs().mean())
    assert diffs[False] < 1e-4 and diffs[True] > 0.01, diffs


def test_predictor_gives_comfyui_the_models_options_with_the_sample_sigmas(monkeypatch):
    """What sampling_function gets as model_options: the run's sample_sigmas in transformer_options and, for a
    MODEL with patches, those patches (a cfg function here, which runs); the MODEL's own options never change."""
    import comfy.samplers

    seen, cfg_calls = [], []
    sampling_function = comfy.samplers.sampling_function

    def spy(model, x, timestep, uncond, cond, cond_scale, model_options=None, **kw):
        seen.append(model_options)
        return sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options=model_options, **kw)

    def cfg_function(args):
        cfg_calls.append(1)
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    monkeypatch.setattr(comfy.samplers, "sampling_function", spy)
    for patched in (False, True):
        with torch.inference_mode():
            model, clip, vae = tiny_models.tiny_model(0), tiny_models.tiny_clip("sd1", 0), tiny_models.tiny_vae(0)
            if patched:
                model = model.clone()
                model.set_model_sampler_cfg_function(cfg_function)
            host = ComfyHost(model, clip, vae, rank=4, alpha=4.0)
        tr = loop.Trainer(host, brightness, PROMPTS, small_config())
        with torch.inference_mode(False):
            tr.generate(PROMPTS[:1], seed=0)
        options = seen[-1]
        assert options["transformer_options"]["sample_sigmas"] is host.sample_sigmas
        assert ("sampler_cfg_function" in options) == patched == bool(cfg_calls)
        for own in (model.model_options, host._model.model_options):
            assert own["transformer_options"] == {} and own is not options


def test_training_offloads_all_but_the_unet_and_clip_through_comfyuis_model_management(monkeypatch):
    """offload_except with ComfyUI's real model management and patchers: after sampling and scoring, the VAE and a
    reward model are unloaded and the U-Net and CLIP stay. ComfyHost asks for it off the CPU only: on the CPU
    (these tests) an epoch asks nothing of free_memory."""
    import comfy.model_management as mm
    import comfy.model_patcher

    comfy_host = importlib.import_module(f"{pack.__name__}.training.hosts.comfy")
    host, model, clip, vae = build()
    reward_model = comfy.model_patcher.ModelPatcher(torch.nn.Linear(3, 1), load_device=host.device,
                                                    offload_device=host.device)

    def reward(images, prompts):
        mm.load_models_gpu([reward_model])  # as the pack's reward nodes do
        return brightness(images, prompts)

    freed = []
    free_memory = mm.free_memory
    monkeypatch.setattr(mm, "free_memory", lambda *a, **kw: freed.append(a) or free_memory(*a, **kw))
    loop.Trainer(host, reward, PROMPTS, small_config(epochs=1)).run(1)
    assert not [a for a in freed if a[0] == math.inf]  # nothing offloaded for training on the CPU

    def loaded() -> list:
        return [m.model for m in mm.current_loaded_models]

    mine = [host._model, host.clip.patcher]
    assert all(any(x is p for x in loaded()) for p in (*mine, vae.patcher, reward_model))
    unloaded = comfy_host.offload_except(host.device, mine)
    assert {id(m.model) for m in unloaded} >= {id(vae.patcher), id(reward_model)}
    assert all(any(x is p for x in loaded()) for p in mine)
    assert not any(x is p for x in loaded() for p in (vae.patcher, reward_model))


def test_a_normalised_reward_mix_keeps_its_statistics_across_resume(tmp_path):
    mix_mod = importlib.import_module(f"{pack.__name__}.rewards.mix")
    jpeg = importlib.import_module(f"{pack.__name__}.rewards.jpeg")
    ckpt = tmp_path / "mix.pt"
    mixes = []
    for _ in range(2):
        host, *_ = build(seed=4)
        mix = mix_mod.RewardMix([brightness, jpeg.JpegReward()], [1.0, 0.5])
        loop.Trainer(host, mix, PROMPTS, small_config(epochs=2), checkpoint_path=ckpt).run(len(mixes) + 1)
        mixes.append(mix.state_dict())
    assert mixes[1]["stats"][0]["count"] == 2 * mixes[0]["stats"][0]["count"] > 0


def test_node_widgets_zero_and_minus_one_mean_the_presets_and_the_models_values():
    """TexForce Train's special widget values (kept for saved workflows) and what they become."""
    train_node = importlib.import_module(f"{pack.__name__}.nodes.train_node")
    widgets = dict(preset="dpok", epochs=3, images_per_epoch=32, images_per_prompt=4, batch_size=4, width=0,
                   height=256, steps=20, guidance=5.0, eta=1.0, learning_rate=1e-3, lora_rank=8, kl_weight=-1.0,
                   advantage="preset", seed=1, optimizer_steps=0)
    asked = []
    cfg = train_node.node_config(**widgets, native_size=lambda: asked.append(True) or 64)
    dpok = config.make_config("dpok")
    assert (cfg.width, cfg.height) == (64, 256) and asked == [True]
    assert cfg.kl_weight == dpok.kl_weight > 0 and cfg.advantage == dpok.advantage
    assert cfg.gradient_accumulation_steps == 4  # 8 micro-batches of 4, the preset's 2 optimizer steps
    assert (cfg.sample_batch_size, cfg.train_batch_size, cfg.lora_rank, cfg.lora_alpha) == (4, 4, 8, 8.0)

    def never() -> int:
        raise AssertionError("both sizes are set: the model's native size is not needed")

    cfg = train_node.node_config(**{**widgets, "width": 128, "kl_weight": 0.0, "advantage": "group",
                                    "optimizer_steps": 8}, native_size=never)
    assert (cfg.width, cfg.height, cfg.kl_weight, cfg.advantage) == (128, 256, 0.0, "group")
    assert cfg.gradient_accumulation_steps == 1
    assert cfg.sde_steps == 0  # sde_steps −1 (the default): the preset's
    fast = {**widgets, "preset": "fast", "width": 64}
    assert train_node.node_config(**fast, native_size=never).sde_steps == config.make_config("fast").sde_steps
    assert train_node.node_config(**fast, sde_steps=0, native_size=never).sde_steps == 0
    assert train_node.node_config(**fast, sde_steps=2, native_size=never).sde_steps == 2


def test_gradient_checkpointing_gives_the_same_gradient_and_leaves_the_unet_as_it_was(monkeypatch):
    """Recomputing the U-Net blocks in backward (memory for time) must not change the LoRA's gradient."""
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    grads = []
    for checkpointing in (False, True):
        host, model, *_ = build(learnable=True)
        host.gradient_checkpointing = checkpointing
        grads.append(lora_gradient(host, small_config()))
        unet = model.model.diffusion_model
        layers = [layer for stage in [*unet.input_blocks, unet.middle_block, *unet.output_blocks] for layer in stage]
        assert all("forward" not in layer.__dict__ for layer in layers)
        assert bool(calls) == checkpointing  # sampling never checkpoints; only the training pass does
    assert grads[1].norm() > 0
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 1e-5


def test_gradient_checkpointing_is_on_by_default_off_the_cpu_only():
    host, *_ = build()
    assert host.gradient_checkpointing is (torch.device(host.device).type != "cpu")
