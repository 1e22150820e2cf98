"""The headless trainer end to end: the real CLI in separate processes, alone and under torchrun (gloo, CPU).

- a run (a normalised mix of JPEG compressibility and batch diversity) writes its LoRA, checkpoint, history and settings; the LoRA loads in ComfyUI's stock LoraLoader and in
  the pack's loader with the conditioning the diffusers host trained;
- 2 processes: after every optimizer step the LoRA is identical on both ranks and equal (within fp32
  rounding, as AdamW and the next epoch's sampling amplify it) to one process on the same global batch and seeds;
- `accelerate launch` gives the torchrun result;
- an interrupted 2-process run resumed by the same command ends where an uninterrupted one does;
- a rank that fails ends the whole run with a clear error instead of a hang.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, pack
from diffusers_builders import write_tiny_sd1
from lora_builders import encode
from test_lora_loading import stock_lora_loader

dhost = importlib.import_module(f"{pack.__name__}.training.hosts.diffusers")
lora_nodes = importlib.import_module(f"{pack.__name__}.nodes.lora_nodes")

WORKER = REPO / "tests" / "headless_worker.py"
SETTINGS = ["num_steps=4", "images_per_epoch=8", "images_per_prompt=2", "sample_batch_size=2", "train_batch_size=1",
            "gradient_accumulation_steps=2", "height=32", "width=32", "lora_rank=4", "lora_alpha=4.0", "lr=0.003",
            "epochs=2", "timestep_fraction=0.5", "advantage=batch", "seed=3"]
STEPS_PER_EPOCH = 4  # 8 images / (1 × 2) per optimizer step
# A normalised mix with a batch-level reward: the mix's statistics must see the whole epoch on every rank, and
# diversity the same sampling batches (a rank's share, 4, is a multiple of sample_batch_size, 2).
REWARD = ["--reward", "jpeg_compressibility:1", "--reward", "diversity:0.5"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("headless")
    d = write_tiny_sd1(root, learnable=True)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "source": "test"})
                                 for p in ["a red apple", "a blue car", "a green tree", "a yellow sun"]) + "\n")
    return {**d, "prompts": prompts, "root": root}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", **{k: str(v) for k, v in extra.items()}})
    return env


def run_cli(tiny, out: Path, nproc: int = 1, extra_args=(), timeout: int = 600, launcher: str = "torchrun",
            **env) -> subprocess.CompletedProcess:
    args = ["--model", str(tiny["checkpoint"]), "--model-config", str(tiny["config"]), "--prompts", str(tiny["prompts"]),
            "--output", str(out), *REWARD, "--name", "tiny_lora",
            *[a for s in SETTINGS for a in ("--set", s)], *extra_args]
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), *args]
    elif launcher == "accelerate":  # --multi_gpu is accelerate's multi-process mode; on CPUs it runs gloo ranks
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0",
               str(WORKER), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _trace(folder: Path, rank: int) -> list[list[torch.Tensor]]:
    steps = sorted(folder.glob(f"rank{rank}_step*.pt"), key=lambda p: int(p.stem.split("step")[1]))
    return [torch.load(p, weights_only=True) for p in steps]


def _traced_run(tiny, name: str, nproc: int) -> dict:
    out, trace = tiny["root"] / name, tiny["root"] / f"trace_{name}"
    trace.mkdir()
    proc = run_cli(tiny, out, nproc, TRACE_DIR=trace)
    _ok(proc)
    return {"out": out, "trace": trace, "proc": proc}


@pytest.fixture(scope="module")
def single_run(tiny):
    return _traced_run(tiny, "single", 1)


@pytest.fixture(scope="module")
def dual_run(tiny):
    return _traced_run(tiny, "dual", 2)


def test_run_folder_and_history(single_run):
    out = single_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "history.jsonl", "run.yaml", "tiny_lora.safetensors"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["n_images"] == 8 and h["optimizer_steps"] == STEPS_PER_EPOCH for h in history)
    assert "epochs: 100%" in single_run["proc"].stderr  # the progress bar ran to the end


def test_trained_lora_loads_in_comfyui(tiny, single_run, loras_dir):
    """The headless file in ComfyUI's stock LoraLoader and in the pack's loader gives the conditioning the
    diffusers host computes with that LoRA (the hosts agree on the same weights: test_headless_parity)."""
    path = single_run["out"] / "tiny_lora.safetensors"
    sd = load_file(str(path))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in sd)
    (loras_dir / "tiny_lora.safetensors").write_bytes(path.read_bytes())

    host = dhost.DiffusersHost(dhost.load_pipeline(tiny["checkpoint"], config=tiny["config"]), rank=4, alpha=4.0)
    host.load_lora_state(sd)
    with torch.no_grad():
        expected = host.encode(["a red apple"])["cross_attn"]
        with host.lora_enabled(False):
            base = host.encode(["a red apple"])["cross_attn"]
    assert (expected - base).abs().max() > 1e-4  # training moved the LoRA

    _, stock_clip = stock_lora_loader(tiny["clip"], "tiny_lora.safetensors", 1.0)
    ours = lora_nodes.TexForceLoraLoader.execute(tiny["clip"], lora_1="tiny_lora.safetensors", strength_1=1.0,
                                                 on_1=True).result[0]
    for clip in (stock_clip, ours):
        cond, _ = encode(clip, "a red apple")
        torch.testing.assert_close(cond, expected, rtol=1e-5, atol=1e-5)


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """‖b − a‖ / ‖a‖ over all the tensors together."""
    diff = sum(float((y.float() - x.float()).norm()) ** 2 for x, y in zip(a, b, strict=True))
    return (diff / sum(float(x.float().norm()) ** 2 for x in a)) ** 0.5


def test_two_processes_stay_in_sync_and_match_one(single_run, dual_run):
    """One process encodes each prompt once per optimizer step for all its samples (the negative prompt's gradient
    summed before its encoder backward), each rank for its own: the step's gradients agree to float rounding
    (1e-7, test_core_loop.py), which AdamW's per-element normalisation and the next epoch's sampling amplify
    (measured: 5e-6 of the LoRA's norm after epoch 1, 2e-4 after epoch 2; until this encoding the runs were
    bit-identical). The limits leave 10× room over that, far below what another set of samples changes."""
    one, r0, r1 = _trace(single_run["trace"], 0), _trace(dual_run["trace"], 0), _trace(dual_run["trace"], 1)
    assert len(one) == len(r0) == len(r1) == 2 * STEPS_PER_EPOCH
    initial_moved = False
    for step, (a, b, c) in enumerate(zip(one, r0, r1), 1):
        assert all(torch.equal(pb, pc) for pb, pc in zip(b, c)), f"ranks differ after step {step}"
        limit = 1e-4 if step <= STEPS_PER_EPOCH else 2e-3
        assert relative_difference(a, b) < limit, (step, relative_difference(a, b))
        initial_moved |= any(float(p.abs().max()) > 0 for p in a[len(a) // 2:])  # LoRA up weights start at 0
    assert initial_moved
    # only rank 0 wrote the run folder, and it holds the same LoRA as the single process (within fp32 rounding)
    a, b = load_file(str(single_run["out"] / "tiny_lora.safetensors")), load_file(str(dual_run["out"] / "tiny_lora.safetensors"))
    assert a.keys() == b.keys() and relative_difference([a[k] for k in a], [b[k] for k in a]) < 2e-3
    hist = [json.loads(x) for x in (dual_run["out"] / "history.jsonl").read_text().splitlines()]
    assert hist[-1]["n_images"] == 8  # the global batch, not one rank's share


def test_accelerate_launch_gives_the_torchrun_result(tiny, dual_run):
    out = tiny["root"] / "dual_accelerate"
    _ok(run_cli(tiny, out, 2, launcher="accelerate"))
    a, b = load_file(str(dual_run["out"] / "tiny_lora.safetensors")), load_file(str(out / "tiny_lora.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_interrupted_two_process_run_resumes_to_the_same_lora(tiny, dual_run):
    out = tiny["root"] / "dual_resumed"
    # 2 reward calls per rank per epoch (4 images each, batches of 2): call 3 is the start of epoch 2
    first = run_cli(tiny, out, 2, INTERRUPT_AT_CALL=3)
    assert first.returncode != 0
    assert "interrupted; the last finished epoch is saved" in first.stderr
    assert [json.loads(x)["epoch"] for x in (out / "history.jsonl").read_text().splitlines()] == [1]
    second = run_cli(tiny, out, 2)
    _ok(second)
    a, b = load_file(str(dual_run["out"] / "tiny_lora.safetensors")), load_file(str(out / "tiny_lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_failing_rank_ends_the_run_with_its_error(tiny):
    out = tiny["root"] / "dual_failing"
    t0 = time.monotonic()
    proc = run_cli(tiny, out, 2, timeout=300, FAIL_RANK=1, FAIL_AT_CALL=3)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 240
    assert "rank 1: RuntimeError: the reward model ran out of memory (injected by the test)" in proc.stderr
    # epoch 1 finished on both ranks before the failure: its checkpoint is there to resume from
    assert (out / "checkpoint.pt").exists()


def test_bad_settings_are_clear_errors(tiny, tmp_path):
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("model: x\nprompts: y\noutput: z\nreward: [{kind: jpeg_compressibility}]\nlearning_rate: 1\n")
    proc = subprocess.run([sys.executable, str(WORKER), "--config", str(bad_yaml)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "unknown setting(s) learning_rate" in proc.stderr
    proc = run_cli(tiny, tmp_path / "o", 1, extra_args=["--set", "lr=fast"])
    assert proc.returncode == 1 and "lr" in proc.stderr
    proc = run_cli(tiny, tmp_path / "o2", 2, extra_args=["--set", "images_per_epoch=7", "--set", "images_per_prompt=1", "--set", "gradient_accumulation_steps=1", "--set", "sample_batch_size=1"])
    assert proc.returncode != 0 and "does not split over 2 processes" in proc.stderr


def test_example_config_is_valid():
    """examples/headless_run.yaml (shown in the README) parses, its training settings and reward kinds exist."""
    cli = importlib.import_module(f"{pack.__name__}.training.cli")
    config = importlib.import_module(f"{pack.__name__}.training.config")
    registry = importlib.import_module(f"{pack.__name__}.rewards.registry")
    settings = cli.load_settings(cli.parse_args(["--config", str(REPO / "examples" / "headless_run.yaml")]))
    cfg = config.make_config(settings.preset, **settings.train)
    assert cfg.train_batch_size * cfg.gradient_accumulation_steps == 16
    assert all(r["kind"] in registry.KINDS and set(r) <= registry.KINDS[r["kind"]].keys() for r in settings.reward)
    assert settings.base_dir == REPO / "examples" and settings.path(settings.prompts) == REPO / "examples" / "prompts.txt"


def test_sigterm_keeps_the_last_finished_epoch(tiny, tmp_path):
    """torchrun/accelerate stop workers with SIGTERM (Ctrl-C sends SIGINT): both end the run cleanly with the
    last finished epoch on disk, resumable."""
    import signal

    out = tmp_path / "stopped"
    args = ["--model", str(tiny["checkpoint"]), "--model-config", str(tiny["config"]), "--prompts", str(tiny["prompts"]),
            "--output", str(out), "--reward", "jpeg_compressibility", *[a for s in SETTINGS for a in ("--set", s)],
            "--set", "epochs=200"]
    proc = subprocess.Popen([sys.executable, str(WORKER), *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "history.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; the last finished epoch is saved" in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] >= 1 and len(state["history"]) == state["epoch"]


def test_half_precision_model_trains_an_fp32_lora(tiny):
    pipe = dhost.load_pipeline(tiny["checkpoint"], config=tiny["config"], dtype=torch.bfloat16)
    host = dhost.DiffusersHost(pipe, rank=4, alpha=4.0)
    assert pipe.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.requires_grad for p in host.trainable_parameters())
    with host.training():
        cond = host.encode(["a red apple"])["cross_attn"]
        with host.predictor(host.encode(["a red apple"]), host.encode([""]), 5.0) as predict:
            eps = predict(torch.randn(1, 4, 4, 4), torch.tensor([500]))
        (eps.square().mean() + cond.square().mean()).backward()
    grads = [p.grad for p in host.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert eps.dtype == torch.float32 and any(float(g.abs().max()) > 0 for g in grads)


@pytest.mark.parametrize("family,encoders,prefixes", [("sdxl", "clip_g", {"lora_te2"}), ("sd2", None, {"lora_te"})])
def test_other_families_end_to_end(family, encoders, prefixes, tmp_path, loras_dir):
    """The CLI on tiny SD 2.x (v-prediction) and SDXL (CLIP-G only): the file has the chosen encoder's keys
    and family metadata, and ComfyUI's stock LoraLoader gives the conditioning the diffusers host trained."""
    from diffusers_builders import write_tiny
    from safetensors import safe_open

    d = write_tiny(tmp_path, family, learnable=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\n")
    out = tmp_path / "run"
    args = ["--model", str(d["checkpoint"]), "--model-config", str(d["config"]), "--prompts", str(prompts),
            "--output", str(out), "--reward", "jpeg_compressibility", "--name", f"tiny_{family}",
            *[a for s in SETTINGS for a in ("--set", s)], "--set", "epochs=1", "--set", "images_per_epoch=4",
            *(["--encoders", encoders] if encoders else [])]
    proc = subprocess.run([sys.executable, str(WORKER), *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    _ok(proc)
    path = out / f"tiny_{family}.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split("_text_model")[0] for k in keys} == prefixes
    assert meta["texforce.family"] == family
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):  # every projection of every layer, as A1111/Forge read
        assert sum(k.endswith(f"self_attn_{proj}.lora_down.weight") for k in keys) == len(keys) // 12

    host = dhost.DiffusersHost(dhost.load_pipeline(d["checkpoint"], config=d["config"]), rank=4, alpha=4.0,
                               encoders=[encoders] if encoders else None)
    host.load_lora_state(load_file(str(path)))
    with torch.no_grad():
        expected = host.encode(["a red apple"])["cross_attn"]
    (loras_dir / path.name).write_bytes(path.read_bytes())
    _, stock_clip = stock_lora_loader(d["clip"], path.name, 1.0)
    cond, _ = encode(stock_clip, "a red apple")
    torch.testing.assert_close(cond, expected, rtol=1e-5, atol=1e-5)


def test_resuming_with_another_model_or_encoder_choice_is_refused(tmp_path):
    """The checkpoint records the family and trained encoders; a resume on another names both."""
    from diffusers_builders import write_tiny

    loop = importlib.import_module(f"{pack.__name__}.training.loop")
    config = importlib.import_module(f"{pack.__name__}.training.config")
    checkpoint = importlib.import_module(f"{pack.__name__}.training.checkpoint")
    import yaml

    cfg = config.make_config("texforce", **{**{k: yaml.safe_load(v) for k, v in (s.split("=") for s in SETTINGS)},
                                             "epochs": 1})
    d = write_tiny(tmp_path / "sdxl", "sdxl")
    pipe = dhost.load_pipeline(d["checkpoint"], config=d["config"])
    ckpt = tmp_path / "checkpoint.pt"
    host = dhost.DiffusersHost(pipe, rank=4, alpha=4.0, encoders=["clip_g"])
    loop.Trainer(host, lambda im, p: im.mean(dim=(1, 2, 3)), ["a red apple"], cfg, checkpoint_path=ckpt).run()
    assert torch.load(ckpt, weights_only=True)["model"] == {"family": "sdxl", "encoders": ["clip_g"]}

    with pytest.raises(ValueError, match="already carries a TexForce LoRA"):
        dhost.DiffusersHost(pipe, rank=4, alpha=4.0)
    both = dhost.DiffusersHost(dhost.load_pipeline(d["checkpoint"], config=d["config"]), rank=4, alpha=4.0)
    with pytest.raises(checkpoint.CheckpointError, match=r"it trained the CLIP-G of SDXL \(CLIP-L \+ CLIP-G\), but "
                       r"this run trains the CLIP-G \+ CLIP-L of SDXL"):
        loop.Trainer(both, lambda im, p: im.mean(dim=(1, 2, 3)), ["a red apple"], cfg, checkpoint_path=ckpt)
    sd1 = write_tiny(tmp_path / "sd1", "sd1")
    other = dhost.DiffusersHost(dhost.load_pipeline(sd1["checkpoint"], config=sd1["config"]), rank=4, alpha=4.0)
    with pytest.raises(checkpoint.CheckpointError, match=r"this run trains the CLIP-L of SD 1.x \(CLIP-L\)"):
        loop.Trainer(other, lambda im, p: im.mean(dim=(1, 2, 3)), ["a red apple"], cfg, checkpoint_path=ckpt)


def test_headless_default_size_is_the_family_native_size():
    family = importlib.import_module(f"{pack.__name__}.training.lora.family")
    assert [family.native_size("sd1"), family.native_size("sd2"), family.native_size("sd2", True),
            family.native_size("sdxl")] == [512, 512, 768, 1024]
