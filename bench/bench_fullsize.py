#!/usr/bin/env python3
"""Peak memory and speed of the real SD 1.5 and SDXL architectures through TexForce's training path, against the
memory plan (training/memory_plan.py).

Run with the project's ComfyUI venv (built by scripts/comfy_host.py), from the repository root:

    PY=$(python3 scripts/comfy_host.py python)
    $PY bench/bench_fullsize.py --plan-only                       # the plan's estimates only (meta device, no memory)
    $PY bench/bench_fullsize.py --skip-too-big --json out.json    # measure every row that fits (CPU: slow, hours)
    $PY bench/bench_fullsize.py --device cuda --dtypes bf16       # on a GPU
    $PY bench/bench_fullsize.py --epoch --device cuda --models sd15 --dtypes bf16   # one Trainer epoch + floors
    $PY bench/bench_fullsize.py --tiny                            # smoke test: tiny configs, seconds

What it builds: the U-Net from ComfyUI's own full config of each model (the dicts of comfy/model_detection.py, which
ComfyUI's detection must map to comfy.supported_models.SD15 / SDXL), in ComfyUI's model class
(`model_config.get_model`), wrapped as a ComfyUI MODEL (ModelPatcher); the CLIP of the model's own clip_target
(SD 1.5: CLIP-L; SDXL: CLIP-L + CLIP-G, ComfyUI's full configs) as a ComfyUI CLIP. Weights are random (no download):
N(0, 1/fan_in) for matrices and convolutions, norms at 1, biases at 0 (NaN-free through every block; the values do
not change memory or time). The models are built under inference mode, as ComfyUI's loader nodes run, and a
ComfyHost (training/hosts/comfy.py) trains a rank-16 LoRA on them.

What one row measures, for batch `--batch` (default 1) at the model's native size (SD 1.5: 512², SDXL: 1024²):
- phase `sampling`: one guided sampling step, `host.predictor(cond, uncond, 5.0)` called on a latent: one U-Net
  call on 2×batch (cond and uncond batched, as ComfyUI's sampling_function does), under no_grad, as the Trainer
  samples. Seconds: per guided U-Net call. Gradient checkpointing plays no part ("-").
- phase `training`: one training micro-batch, `Trainer.backward_microbatch` (training/update.py) of `batch`
  samples at one trained timestep (K = 1): the text encoders with the LoRA under grad, one U-Net forward on 2×batch
  with its backward to the conditioning, the DDIM log-prob, the loss (SF; see bench_config), the encoders'
  backward into the LoRA.
  Seconds: per micro-batch (its one U-Net call, forward and backward, plus the encoders). With and without
  gradient checkpointing (ComfyHost.gradient_checkpointing).
- measured peak: memory above the baseline taken right before the phase, with the weights built and loaded (and
  the conditioning of the sampling step encoded), after the phase ran once on an 8×8 latent (a warm-up that pages
  in the kernels' code and makes the libraries' workspaces and ComfyUI's first-call state, cheaply).
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.
  CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus its resident
  set (VmRSS) before; each CPU row runs in a fresh subprocess (`--process-per row`, the CPU's default), so no
  memory freed by an earlier phase is reused unseen.
  Weights: measured = RSS growth while building (CPU) or memory_allocated once loaded (CUDA).
- plan: MemoryPlan.sampling_peak / training_peak of plan_memory(host.memory_inputs(cfg)) for the same settings,
  minus its weights and trajectory parts (the measurement starts above them), so estimate and measurement count
  the same things; ratio = plan / measured (the plan is meant to be an upper estimate: ≥ 1, not far above).
  The plan counts LoRA + AdamW state (16 bytes per LoRA parameter); the micro-batch allocates only gradients (4):
  a few MiB, below the table's precision.

Attention is ComfyUI's choice for the device (CPU: sub-quadratic, softmax maps kept for backward; NVIDIA:
PyTorch SDPA) unless `--attention pytorch` swaps PyTorch's SDPA in on the CPU too (as tests/test_memory_plan.py
does); the plan reads the same choice. Note for reading the sampling rows on the CPU: ComfyUI's sub-quadratic
attention slices only as much as free memory requires, so with RAM to spare it computes whole softmax maps
(batch·heads·tokens² per attention) even without gradient; the plan's sampling estimate assumes slicing and counts
none (on the tiny model: 0.13 GiB measured against 0.005 GiB planned, all of it in baddbmm/softmax).

`--skip-too-big` first builds every model on the meta device (no memory) in a subprocess, computes the plan of each
row, and skips, saying why, each row whose plan (weights included, + 1 GiB for the process) exceeds the available
RAM (CPU; MemAvailable when the row starts) or free device memory (CUDA; RAM must still hold the weights while they
are built). SDXL fp32 without checkpointing needs far more than 23 GiB of RAM with ComfyUI's CPU attention.

`--epoch`: one warm-up and one measured Trainer epoch (`--epoch-images` images, `--epoch-steps` DDIM steps, VAE
decode of random SD-VAE weights, mean-brightness reward) of the first of --models/--dtypes, per --checkpointing
value, with its peak memory against the plan's, then bench/bench_train.py's compute floors on the same U-Net and
the epoch's ratios to them (the training floor is without checkpointing).

Last line of output: one JSON summary (also written to --json OUT).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3
MIB = 1024 ** 2
PROMPT = "a photograph of an astronaut riding a horse on the moon"
ROW_TAG = "BENCH_FULLSIZE_ROW "
# Before the baseline, each phase runs once on a WARM_UP_LATENT² latent: the first call pages in the kernels' code
# (counted in the RSS on the CPU), creates library workspaces and ComfyUI's first-call state; none of that is the
# phase's working set, and a small latent makes it cheap.
WARM_UP_LATENT = 8
PROCESS_OVERHEAD = 1.0 * GIB  # python, torch, ComfyUI: what a row's process holds besides the plan

# ComfyUI's own configs of the real U-Nets (comfy/model_detection.py, unet_config_from_diffusers_unet)
SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}
MODELS = {  # key: (ComfyUI config class, full U-Net config, native size, tiny family, tiny size)
    "sd15": ("SD15", SD15_UNET, 512, "sd1", 256),
    "sdxl": ("SDXL", SDXL_UNET, 1024, "sdxl", 256),
}
LABELS = {"sd15": "SD 1.5", "sdxl": "SDXL"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# SD VAE (AutoencoderKL) for --epoch's decode
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"],
                   help="weights and compute dtype of the U-Net (the CLIP's weights too; it computes in fp32)")
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="gradient checkpointing settings of the training rows (default both)")
    p.add_argument("--phases", nargs="+", choices=["sampling", "training"], default=["sampling", "training"])
    p.add_argument("--batch", type=int, default=1, help="images per sampling step / training micro-batch")
    p.add_argument("--size", type=int, default=None,
                   help="pixels (square) instead of the model's native size (SD 1.5: 512, SDXL: 1024; tiny: 256)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available, else the CPU")
    p.add_argument("--attention", choices=["comfy", "pytorch"], default="comfy",
                   help="comfy: ComfyUI's choice for the device; pytorch: PyTorch SDPA everywhere")
    p.add_argument("--calls", type=int, default=None,
                   help="calls per row; the first is warm-up for the time when more (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every row's process")
    p.add_argument("--no-onednn", action="store_true",
                   help="CPU: PyTorch's own convolution kernels instead of oneDNN's. On CPUs without AVX512-BF16 "
                        "oneDNN's bf16 convolution is 75-200x slower than fp32 here (ATen's ~6x): the bf16 rows "
                        "take tens of minutes instead of many hours; autograd saves the same tensors")
    p.add_argument("--process-per", choices=["row", "model"], default=None,
                   help="a fresh process per row (default on CPU: the RSS high-water mark is per process) or per "
                        "model and dtype (default on CUDA: max_memory_allocated resets per phase)")
    p.add_argument("--skip-too-big", action="store_true",
                   help="skip rows whose plan exceeds the available RAM / free device memory, saying why")
    p.add_argument("--plan-only", action="store_true", help="print the plan's estimates only (meta device)")
    p.add_argument("--epoch", action="store_true", help="one Trainer epoch + bench_train's floors instead of rows")
    p.add_argument("--epoch-images", type=int, default=4)
    p.add_argument("--epoch-steps", type=int, default=10)
    p.add_argument("--flops", action="store_true",
                   help="count the FLOPs of bench_train's epoch at full size (meta device, seconds): how much of it "
                        "is VAE decode and text encoder against the U-Net")
    p.add_argument("--work-ratio", type=float, default=None,
                   help="with --flops: bench_train's measured total / work floor, to project total / floor at full "
                        "size")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net/CLIP configs (tests' tiny models): a smoke test")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--timeout", type=float, default=None, help="seconds per row process (default: none)")
    p.add_argument("--verbose", action="store_true", help="ComfyUI's and the trainer's INFO logs")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal: one row process
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------
# Memory of this process
# ----------------------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM in bytes (Linux); {} elsewhere."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    return {k: int(m.group(1)) * 1024 for k in ("VmRSS", "VmHWM")
            if (m := re.search(rf"^{k}:\s+(\d+)\s+kB", text, re.M))}


def reset_hwm() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux ≥ 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    s = proc_status()
    return bool(s) and s["VmHWM"] <= s["VmRSS"] + 4 * MIB


def mem_available() -> float | None:
    try:
        m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return float(m.group(1)) * 1024 if m else None


class Peak:
    """Peak memory of a region above what was allocated when it started: CUDA allocator or process RSS."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        self.device = device
        self.base = 0
        self.reset_ok = True

    def allocated(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return self.torch.cuda.memory_allocated(self.device)
        return proc_status().get("VmRSS", 0)

    def start(self) -> None:
        if self.cuda:
            self.base = self.allocated()
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.reset_ok = reset_hwm()
            self.base = proc_status().get("VmRSS", 0)

    def stop(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return self.torch.cuda.max_memory_allocated(self.device) - self.base
        return proc_status().get("VmHWM", 0) - self.base


class Clock:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# ComfyUI in this process, the models
# ----------------------------------------------------------------------------------------------
def _load(name: str, path: Path, package: bool = False):
    """A module by its file path, once: scripts/inprocess.py's loader (itself loaded by path the first time)."""
    if "texforce_inprocess" not in sys.modules:
        spec = importlib.util.spec_from_file_location("texforce_inprocess", REPO / "scripts" / "inprocess.py")
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["texforce_inprocess"]._load(name, path, package)


def setup(device: str, attention: str, verbose: bool = False) -> dict[str, Any]:
    """ComfyUI and the pack in this process (scripts/inprocess.py), on the CPU or the accelerator."""
    import torch

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_fullsize: --device cuda, but torch sees no CUDA device")
    inprocess = _load("texforce_inprocess", REPO / "scripts" / "inprocess.py")
    inprocess.setup(cpu=device == "cpu")
    import comfy.ldm.modules.attention
    import comfy.model_management as mm

    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    if attention == "pytorch":  # as tests/test_memory_plan.py: the U-Net's attention and the plan read this
        comfy.ldm.modules.attention.optimized_attention = comfy.ldm.modules.attention.attention_pytorch
    mod = inprocess.pack_module
    return {"torch": torch, "mm": mm, "ComfyHost": mod("training.hosts.comfy").ComfyHost,
            "comfy_host": mod("training.hosts.comfy"),
            "loop": mod("training.loop"), "config": mod("training.config"), "mp": mod("training.memory_plan"),
            "sampling": mod("training.sampling"),
            "attention": comfy.ldm.modules.attention.optimized_attention.__name__}


def init_random(module, seed: int) -> None:
    """N(0, 1/fan_in) for matrices and convolutions, norms 1, the rest 0; in place (no copies), skips meta."""
    import torch

    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)  # comfy ops subclass these (ResBlocks' in_layers.0, ...)
    with torch.no_grad():
        for module_ in module.modules():
            for name, p in module_.named_parameters(recurse=False):
                if p.device.type == "meta":
                    continue
                if p.ndim >= 2:
                    p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
                elif isinstance(module_, norms) and name == "weight":
                    p.fill_(1.0)
                else:
                    p.zero_()


def build(env, model_key: str, dtype_name: str, tiny: bool, meta: bool = False, seed: int = 0):
    """(MODEL, CLIP) of one family in ComfyUI's classes, random weights (meta: no storage at all)."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    torch, mm = env["torch"], env["mm"]
    class_name, full_config, _, family, _ = MODELS[model_key]
    config_class = getattr(comfy.supported_models, class_name)
    dtype = getattr(torch, DTYPES[dtype_name])
    if tiny:
        tiny_models = _tiny_models()
        unet_config = dict(tiny_models.TINY_UNET if family == "sd1" else tiny_models.TINY_UNET_SDXL)
        if family == "sdxl":
            unet_config.update(num_heads=-1, num_head_channels=16)  # as tiny_models.tiny_unet
        model_config = config_class(unet_config)
        clip_target = tiny_models._make_clip(family)
    else:
        unet_config = dict(full_config)
        detected = comfy.model_detection.model_config_from_unet_config(unet_config)
        if type(detected) is not config_class:
            raise RuntimeError(f"ComfyUI detects the {model_key} config as {type(detected).__name__}, not {class_name}")
        model_config = detected
        clip_target = model_config.clip_target()
    model_config.set_inference_dtype(dtype, None)
    device = torch.device("meta") if meta else torch.device("cpu")
    base = model_config.get_model({}, device=device)
    init_random(base, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    options = {"dtype": dtype, **({"initial_device": device} if meta else {})}
    clip = comfy.sd.CLIP(target=clip_target, model_options=options)
    init_random(clip.cond_stage_model, seed + 1)
    return model, clip


def build_vae(env, tiny: bool, seed: int = 2):
    """A ComfyUI VAE (SD's AutoencoderKL; tiny: the tests' tiny one) with random weights, for --epoch's decode."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch = env["torch"]
    if tiny:
        tiny_models = _tiny_models()
        ddconfig = dict(tiny_models.TINY_VAE)
    else:
        ddconfig = dict(SD_VAE)
    cfg = {"ddconfig": ddconfig, "embed_dim": 4}
    vae = AutoencoderKL(**cfg)
    init_random(vae, seed)
    return comfy.sd.VAE(sd=vae.state_dict(), config={"params": cfg}, dtype=torch.float32)


def model_size(model_key: str, tiny: bool, override: int | None = None) -> int:
    _, _, size, _, tiny_size = MODELS[model_key]
    return override or (tiny_size if tiny else size)


def bench_config(env, size: int, batch: int, **kw):
    """The run settings of one row: `batch` images at size², 10 DDIM steps, guidance 5, K = 1, LoRA rank 16.

    The loss is DDPO-SF rather than the default PPO clip: the training row scores a made-up transition whose old
    log-prob is arbitrary, and PPO's clip zeroes the gradient whenever the ratio leaves [1−ε, 1+ε] (a gradient of
    exact zeros says nothing about NaNs). Memory and compute are the same: both differ only in ops on (batch,)
    log-probs."""
    base = dict(num_steps=10, images_per_epoch=batch, images_per_prompt=1, sample_batch_size=batch,
                train_batch_size=batch, gradient_accumulation_steps=1, height=size, width=size, epochs=1,
                advantage="batch", timestep_fraction=0.1, lora_rank=16, lora_alpha=16.0, guidance=5.0, loss="sf")
    return env["config"].make_config("texforce", **{**base, **kw})


def plan_numbers(env, host, cfg) -> dict[str, float]:
    """The plan of these settings: per phase its peak above the weights and trajectories, and the weights."""
    plan = env["mp"].plan_memory(host.memory_inputs(cfg))
    above = {"sampling": plan.sampling_peak - plan.sampling["weights"] - plan.sampling["trajectories"],
             "training": plan.training_peak - plan.training["weights"] - plan.training["trajectories"]}
    return {"sampling": above["sampling"], "training": above["training"], "weights": plan.training["weights"],
            "total_sampling": plan.sampling_peak, "total_training": plan.training_peak,
            "attention": plan.inputs.attention, "describe": plan.describe()}


# ----------------------------------------------------------------------------------------------
# The measurements (inside a row process)
# ----------------------------------------------------------------------------------------------
def measure_sampling(env, host, cfg, calls: int, peak: Peak, clock: Clock) -> dict[str, Any]:
    """One guided sampling step (cond + uncond in one U-Net batch) under no_grad, `calls` times."""
    torch, mm = env["torch"], env["mm"]
    b = cfg.sample_batch_size
    g = torch.Generator().manual_seed(1)
    times, out = [], None
    with torch.inference_mode(False), torch.no_grad():
        cond, uncond = host.encode([PROMPT] * b), host.encode([cfg.negative_prompt])
        x = torch.randn((b, *host.latent_shape(cfg.height, cfg.width)), generator=g).to(host.device)
        t = torch.full((b,), 501, dtype=torch.long)
        with host.predictor(cond, uncond, cfg.guidance) as predict:  # warm-up on a small latent, see warm_up
            predict(x[..., :WARM_UP_LATENT, :WARM_UP_LATENT].contiguous(), t)
        mm.load_models_gpu([host._model])  # ComfyUI loads lazily: the weights belong to the baseline
        gc.collect()
        peak.start()
        with host.predictor(cond, uncond, cfg.guidance) as predict:
            for _ in range(calls):
                t0 = clock()
                out = predict(x, t)
                times.append(clock() - t0)
        used = peak.stop()
    return {"peak": used, "times": times, "finite": bool(torch.isfinite(out).all()),
            "output_std": float(out.float().std())}


def measure_training(env, host, trainer, cfg, calls: int, peak: Peak, clock: Clock) -> dict[str, Any]:
    """One micro-batch of Trainer.backward_microbatch at one trained timestep (the chain's first, noisiest step) on a
    made-up trajectory: random latents, old log-probs 0, advantage 1 (the loss is SF: see bench_config)."""
    torch, mm = env["torch"], env["mm"]
    b, n = cfg.train_batch_size, cfg.num_steps
    g = torch.Generator().manual_seed(2)
    traj = env["sampling"].Trajectory(
        prompts=[PROMPT] * b,
        latents=torch.randn((b, n + 1, *host.latent_shape(cfg.height, cfg.width)), generator=g).to(host.device),
        log_probs=torch.zeros((b, n), device=host.device), images=torch.zeros((b, 1, 1, 3)),
        rewards=torch.zeros(b), advantages=torch.ones(b))
    columns = torch.zeros((b, 1), dtype=torch.long)
    times = []
    with torch.inference_mode(False):
        small = dataclasses.replace(traj, latents=traj.latents[..., :WARM_UP_LATENT, :WARM_UP_LATENT].contiguous())
        with host.training(), torch.enable_grad():  # warm-up on a small latent (loads the models too)
            trainer.backward_microbatch(small, torch.arange(b), columns, 1.0)
        for p in host.trainable_parameters():
            p.grad = None
        del small
        mm.load_models_gpu([host._model])
        gc.collect()
        peak.start()
        for _ in range(calls):
            t0 = clock()
            with host.training(), torch.enable_grad():
                trainer.backward_microbatch(traj, torch.arange(b), columns, 1.0)
            times.append(clock() - t0)
        used = peak.stop()
    # (SD 1.x/SDXL read CLIP-L's penultimate layer: its last layer's LoRA gets no gradient, None)
    grads = [p.grad for p in host.trainable_parameters() if p.grad is not None]
    finite = bool(grads) and all(bool(torch.isfinite(gr).all()) for gr in grads)
    norm = float(torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads))) if grads else 0.0
    finite = finite and norm > 0
    for p in host.trainable_parameters():
        p.grad = None
    return {"peak": used, "times": times, "finite": finite, "grad_norm": norm}


def seconds(times: list[float]) -> float:
    """The time of one call: the median after the first (warm-up) when there are several."""
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def run_worker(spec: dict[str, Any]) -> int:
    """One process: build a model and measure (or, on the meta device, only plan) the given phases."""
    env = setup(spec["device"], spec["attention"], spec.get("verbose", False))
    torch, mm = env["torch"], env["mm"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("no_onednn"):
        torch.backends.mkldnn.enabled = False
    device = mm.get_torch_device()
    meta = spec.get("meta", False)
    key, dtype_name, tiny = spec["model"], spec["dtype"], spec["tiny"]
    size = model_size(key, tiny, spec.get("size"))
    rss0 = proc_status().get("VmRSS", 0)
    t0 = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI's loader nodes: the weights are inference tensors
        model, clip = build(env, key, dtype_name, tiny, meta=meta)
        host = env["ComfyHost"](model, clip, None, rank=16, alpha=16.0, seed=0, gradient_checkpointing=False)
    build_s = time.perf_counter() - t0
    cfg = bench_config(env, size, spec["batch"])
    common = {"model": key, "label": LABELS[key] + (" (tiny)" if tiny else ""), "size": size, "dtype": dtype_name,
              "batch": spec["batch"], "device": str(device), "attention": env["attention"],
              "onednn": torch.backends.mkldnn.enabled,
              "unet_parameters": sum(p.numel() for p in model.model.diffusion_model.parameters()),
              "clip_parameters": sum(p.numel() for p in clip.cond_stage_model.parameters()),
              "build_s": round(build_s, 2)}
    if meta:
        info = {}
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            info = {"device_free": free, "device_total": total}
        for phase in spec["phases"]:
            host.gradient_checkpointing = phase.get("checkpointing", False)
            row = {**common, **phase, "plan": plan_numbers(env, host, cfg), **info}
            print(ROW_TAG + json.dumps(row), flush=True)
        return 0

    trainer = env["loop"].Trainer(host, lambda images, prompts: images.mean(dim=(1, 2, 3)), [PROMPT], cfg)
    peak, clock = Peak(torch, device), Clock(torch, device)
    calls = spec["calls"]
    if device.type == "cuda":
        mm.load_models_gpu([host._model])
        with torch.inference_mode(False), torch.no_grad():
            host.encode([PROMPT])
        weights = peak.allocated()
    else:
        weights = proc_status().get("VmRSS", 0) - rss0
    for phase in spec["phases"]:
        host.gradient_checkpointing = phase.get("checkpointing", False)
        plan = plan_numbers(env, host, cfg)
        try:
            if phase["phase"] == "sampling":
                m = measure_sampling(env, host, cfg, calls, peak, clock)
            else:
                m = measure_training(env, host, trainer, cfg, calls, peak, clock)
        except Exception as e:  # e.g. out of device memory: report it, go on with the next phase
            for p in host.trainable_parameters():
                p.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(ROW_TAG + json.dumps({**common, **phase, "plan": plan, "error": f"{type(e).__name__}: {e}"[:300]}),
                  flush=True)
            continue
        row = {**common, **phase, "plan": plan, "measured": m["peak"], "weights_measured": weights,
               "seconds": seconds(m["times"]), "times": [round(x, 4) for x in m["times"]], "finite": m["finite"],
               "hwm_reset": peak.reset_ok, **{k: v for k, v in m.items() if k in ("grad_norm", "output_std")}}
        print(ROW_TAG + json.dumps(row), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# The parent: rows, processes, the table
# ----------------------------------------------------------------------------------------------
def phases_of(args) -> list[dict[str, Any]]:
    out = []
    if "sampling" in args.phases:
        out.append({"phase": "sampling"})
    if "training" in args.phases:
        out += [{"phase": "training", "checkpointing": c == "on"} for c in args.checkpointing]
    return out


def run_process(spec: dict[str, Any], timeout: float | None) -> tuple[list[dict], str | None]:
    """Run one worker process; (its rows, an error line or None)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              cwd=REPO)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s"
    rows = [json.loads(line[len(ROW_TAG):]) for line in proc.stdout.splitlines() if line.startswith(ROW_TAG)]
    for line in proc.stdout.splitlines():
        if not line.startswith(ROW_TAG) and line.strip():
            print(f"    | {line}", flush=True)
    if proc.returncode != 0:
        tail = " / ".join(proc.stderr.strip().splitlines()[-3:])
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return rows, f"{why}: {tail}"
    if spec.get("verbose") and proc.stderr.strip():
        print(proc.stderr, file=sys.stderr)
    return rows, None


def row_key(r: dict[str, Any]) -> tuple:
    return (r["model"], r["dtype"], r["phase"], r.get("checkpointing"))


def ckpt_label(r: dict[str, Any]) -> str:
    return "-" if r["phase"] == "sampling" else ("on" if r.get("checkpointing") else "off")


def gib(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x / GIB:.{digits}f}"


def print_table(rows: list[dict[str, Any]], plan_only: bool) -> None:
    if plan_only:
        head = f"{'model':14s} {'size':>5s} {'dtype':5s} {'ckpt':4s} {'phase':8s} {'plan GiB':>9s} " \
               f"{'plan total':>10s} {'weights':>8s}"
        print(head)
        print("-" * len(head))
        for r in rows:
            p = r["plan"]
            print(f"{r['label']:14s} {r['size']:5d} {r['dtype']:5s} {ckpt_label(r):4s} {r['phase']:8s} "
                  f"{gib(p[r['phase']]):>9s} {gib(p['total_' + r['phase']]):>10s} {gib(p['weights']):>8s}")
        return
    head = (f"{'model':14s} {'size':>5s} {'dtype':5s} {'ckpt':4s} {'phase':8s} {'measured GiB':>12s} "
            f"{'plan GiB':>9s} {'plan/meas':>9s} {'s/U-Net call':>12s} {'weights meas/plan':>17s} {'ok':3s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        p = r.get("plan") or {}
        est = p.get(r["phase"])
        if "error" in r or "skipped" in r:
            what = "SKIPPED: " + r["skipped"] if "skipped" in r else "FAILED: " + r["error"]
            print(f"{r['label']:14s} {r['size']:5d} {r['dtype']:5s} {ckpt_label(r):4s} {r['phase']:8s} "
                  f"{'-':>12s} {gib(est):>9s} {what}")
            continue
        meas = r["measured"]
        ratio = f"{est / meas:.2f}" if est is not None and meas >= MIB else "-"  # below 1 MiB: noise
        ok = "yes" if r["finite"] and r.get("hwm_reset", True) else ("NaN" if not r["finite"] else "hwm?")
        print(f"{r['label']:14s} {r['size']:5d} {r['dtype']:5s} {ckpt_label(r):4s} {r['phase']:8s} "
              f"{gib(meas, 3):>12s} {gib(est, 3):>9s} {ratio:>9s} {r['seconds']:12.3f} "
              f"{gib(r['weights_measured']) + '/' + gib(p.get('weights')):>17s} {ok:3s}")


def plan_rows(args, device: str) -> list[dict[str, Any]]:
    """Every row's plan, from the models built on the meta device (one subprocess per model and dtype)."""
    rows = []
    for key in args.models:
        for dtype in args.dtypes:
            spec = {"model": key, "dtype": dtype, "tiny": args.tiny, "device": device, "meta": True, "size": args.size,
                    "phases": phases_of(args), "batch": args.batch, "attention": args.attention,
                    "verbose": args.verbose}
            got, err = run_process(spec, args.timeout)
            if err:
                raise SystemExit(f"bench_fullsize: planning {key} {dtype} failed: {err}")
            rows += got
    return rows


def too_big(plan_row: dict[str, Any], device: str) -> str | None:
    """Why a row cannot fit (None when it can): its plan against the memory available now."""
    p = plan_row["plan"]
    need = p["total_" + plan_row["phase"]]
    ram = mem_available()
    if device == "cpu":
        if ram is not None and need + PROCESS_OVERHEAD > ram:
            return (f"plan {need / GIB:.1f} GiB (weights {p['weights'] / GIB:.1f}) + {PROCESS_OVERHEAD / GIB:.0f} "
                    f"GiB for the process > {ram / GIB:.1f} GiB available RAM")
        return None
    free = plan_row.get("device_free")
    if free is not None and need > free:
        return f"plan {need / GIB:.1f} GiB > {free / GIB:.1f} GiB free on {device}"
    if ram is not None and p["weights"] + PROCESS_OVERHEAD > ram:
        return f"building the weights ({p['weights'] / GIB:.1f} GiB) needs more than {ram / GIB:.1f} GiB of RAM"
    return None


def header(args, device: str) -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ram = mem_available()
    gpu = f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    return (f"TexForce full-size benchmark{' (TINY configs)' if args.tiny else ''}: torch {torch.__version__}, "
            f"device {device}{gpu}, {platform.machine()}, {os.cpu_count()} CPUs, threads "
            f"{args.threads or os.environ.get('OMP_NUM_THREADS') or 'default'}, load average "
            f"{'-' if load is None else round(load, 2)}, RAM available {gib(ram, 1)} GiB; batch {args.batch}, "
            f"attention {args.attention}" + (", oneDNN off" if getattr(args, "no_onednn", False) else ""))


def main_rows(args, device: str) -> dict[str, Any]:
    print(header(args, device), flush=True)
    calls = args.calls or (3 if device == "cuda" else 1)
    per = args.process_per or ("model" if device == "cuda" else "row")
    plans = {row_key(r): r for r in plan_rows(args, device)} if (args.skip_too_big or args.plan_only) else {}
    if args.plan_only:
        rows = list(plans.values())
        print_table(rows, plan_only=True)
        return {"rows": rows}
    jobs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for key in args.models:
        for dtype in args.dtypes:
            base = {"model": key, "dtype": dtype, "tiny": args.tiny, "device": device, "batch": args.batch,
                    "size": args.size,
                    "calls": calls, "attention": args.attention, "threads": args.threads, "verbose": args.verbose,
                    "no_onednn": args.no_onednn}
            phases = phases_of(args)
            groups = [[ph] for ph in phases] if per == "row" else [phases]
            jobs += [(base, g) for g in groups]
    rows: list[dict[str, Any]] = []
    for base, group in jobs:
        todo = []
        for ph in group:
            key = (base["model"], base["dtype"], ph["phase"], ph.get("checkpointing"))
            stub = {"model": base["model"], "label": LABELS[base["model"]] + (" (tiny)" if args.tiny else ""),
                    "size": model_size(base["model"], args.tiny, args.size), "dtype": base["dtype"], **ph,
                    "plan": plans.get(key, {}).get("plan")}
            why = too_big(plans[key], device) if args.skip_too_big and key in plans else None
            if why:
                print(f"  skipping {stub['label']} {stub['size']}² {stub['dtype']} {ph['phase']} checkpointing "
                      f"{ckpt_label(stub)}: {why}", flush=True)
                rows.append({**stub, "skipped": why})
            else:
                todo.append((ph, stub))
        if not todo:
            continue
        what = ", ".join(f"{ph['phase']}" + ("" if ph["phase"] == "sampling" else
                                             f" (checkpointing {ckpt_label(stub)})") for ph, stub in todo)
        print(f"  {todo[0][1]['label']} {todo[0][1]['size']}² {base['dtype']}: {what} ...", flush=True)
        t0 = time.perf_counter()
        got, err = run_process({**base, "phases": [ph for ph, _ in todo]}, args.timeout)
        by_key = {row_key(r): r for r in got}
        for ph, stub in todo:
            r = by_key.get(row_key(stub))
            if r is None:
                rows.append({**stub, "error": err or "no result"})
            elif "error" in r:
                rows.append(r)
                print(f"    {r['phase']} {ckpt_label(r)}: FAILED: {r['error']}", flush=True)
            else:
                rows.append(r)
                print(f"    {r['phase']} {ckpt_label(r)}: measured {gib(r['measured'], 3)} GiB, plan "
                      f"{gib(r['plan'][r['phase']], 3)} GiB, {r['seconds']:.3f} s", flush=True)
        print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print_table(rows, plan_only=False)
    print("\nmeasured: peak above the weights (and the encoded conditioning); plan: plan_memory's peak minus its "
          "weights and trajectories; s/U-Net call: sampling = one guided call (cond+uncond batched), training = one "
          "micro-batch (encoders + one U-Net forward and backward); weights: measured / plan (U-Net + CLIP)")
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# --epoch: one Trainer epoch and bench_train's floors
# ----------------------------------------------------------------------------------------------
def _cast_inputs_class():
    import torch

    class CastInputs(torch.nn.Module):
        """The bare U-Net with its inputs cast to its dtype, as ComfyUI's apply_model does (bench_train's floors
        call the U-Net on fp32 inputs, which a bf16 U-Net cannot take)."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.dtype = next(unet.parameters()).dtype

        def forward(self, x, timesteps, context=None, **kw):
            return self.unet(x.to(self.dtype), timesteps, context=context.to(self.dtype), **kw)

    return CastInputs


def main_epoch(args, device_name: str) -> dict[str, Any]:
    env = setup(device_name, args.attention, args.verbose)
    torch, mm, loop, config = env["torch"], env["mm"], env["loop"], env["config"]
    if args.threads:
        torch.set_num_threads(args.threads)
    bt = _load("texforce_bench_train", REPO / "bench" / "bench_train.py")
    CastInputs = _cast_inputs_class()
    device = mm.get_torch_device()
    print(header(args, device.type), flush=True)
    key, dtype = args.models[0], args.dtypes[0]
    size = model_size(key, args.tiny, args.size)
    with torch.inference_mode():
        model, clip = build(env, key, dtype, args.tiny)
        vae = build_vae(env, args.tiny)
        host = env["ComfyHost"](model, clip, vae, rank=16, alpha=16.0, seed=0)
    clock, peak = Clock(torch, device), Peak(torch, device)
    vae_bytes = vae.patcher.model_size()
    n = args.epoch_images
    cfg = config.make_config("texforce", num_steps=args.epoch_steps, images_per_epoch=n, images_per_prompt=min(2, n),
                             sample_batch_size=n, train_batch_size=min(2, n), gradient_accumulation_steps=1,
                             height=size, width=size, epochs=2, advantage="batch", timestep_fraction=0.5,
                             lora_rank=16, lora_alpha=16.0, seed=0)
    K = config.train_timesteps(cfg)
    prompts = [PROMPT, "a red apple on a wooden table", "a blue car in the snow", "a green tree by a lake"]
    print(f"{LABELS[key]}{' (tiny)' if args.tiny else ''} {size}² {dtype}: {n} images/epoch, {cfg.num_steps} steps, "
          f"K={K}, sample batch {cfg.sample_batch_size}, train batch {cfg.train_batch_size}", flush=True)
    results = []
    for ckpt in args.checkpointing:
        host.gradient_checkpointing = ckpt == "on"
        plan = env["mp"].plan_memory(host.memory_inputs(cfg))
        trainer = loop.Trainer(host, bt.brightness, prompts, cfg)
        decode_times = bt.time_decode(host, clock)
        trainer.run(1)  # warm-up (loads everything)
        decode_times.clear()
        peak.start()
        base = peak.base
        s = trainer.run(2)[0]
        used = peak.stop()
        del host.decode
        total = used + base if device.type == "cuda" else None  # CUDA: absolute max allocated
        # the floors on the same U-Net (bench_train.py): bare forwards / forward+backward without checkpointing
        mm.load_models_gpu([model, vae.patcher])
        unet = CastInputs(model.model.diffusion_model)
        twin = CastInputs(bt.non_inference_copy({"torch": torch}, unet.unet))
        floors = bt.Floors({"torch": torch}, host, cfg, bt.Clock(torch, device), unet, twin, K,
                           autoencoder=vae.first_stage_model)
        fs, ft, fd = floors.measure_sampling(), floors.measure_training(), floors.measure_decode()
        epoch_s = s.seconds_sampling + s.seconds_reward + s.seconds_training
        del twin, floors
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dec = sum(decode_times)
        r = {"model": key, "size": size, "dtype": dtype, "checkpointing": ckpt == "on",
             "seconds_sampling": s.seconds_sampling, "seconds_training": s.seconds_training, "decode_s": dec,
             "sampling_floor_s": fs, "training_floor_s": ft, "sampling_ratio": s.seconds_sampling / fs,
             "sampling_ratio_without_decode": (s.seconds_sampling - dec) / fs,
             "training_ratio": s.seconds_training / ft, "decode_floor_s": fd, "total_ratio": epoch_s / (fs + ft),
             "work_ratio": epoch_s / (fs + ft + fd), "peak_above_start": used, "peak_total_cuda": total,
             "plan_peak": plan.peak, "plan_above_weights": plan.peak - plan.training["weights"],
             "vae_weights": vae_bytes, "reward_mean": s.reward_mean, "plan": plan.describe()}
        results.append(r)
        print(f"  checkpointing {ckpt}: sampling {s.seconds_sampling:.3f} s (decode {dec:.3f} s), training "
              f"{s.seconds_training:.3f} s; floors: sampling {fs:.3f} s, training {ft:.3f} s (no checkpointing); "
              f"ratios: sampling {r['sampling_ratio']:.3f} (without decode {r['sampling_ratio_without_decode']:.3f}), "
              f"training {r['training_ratio']:.3f}; total / U-Net floors {r['total_ratio']:.3f}, total / (U-Net floors "
              f"+ bare decode {fd:.3f} s) {r['work_ratio']:.3f}", flush=True)
        print(f"    peak memory of the epoch: {gib(used, 3)} GiB above its start"
              + (f", {gib(total, 3)} GiB allocated in all" if total is not None else " (RSS high-water)")
              + f"; plan: {gib(plan.peak, 3)} GiB in all, {gib(plan.peak - plan.training['weights'], 3)} GiB above "
                f"the weights ({plan.describe()}); the plan counts no VAE (weights {gib(vae_bytes, 3)} GiB) nor its "
                "decode, which the measured peak includes", flush=True)
    return {"epoch": results}


# ----------------------------------------------------------------------------------------------
# --flops: the work of bench_train's epoch at full size, counted on the meta device
# ----------------------------------------------------------------------------------------------
def count_flops(fn) -> int:
    """FLOPs of everything fn runs (forward and any backward inside it), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_flops(env, model_key: str, tiny: bool, size: int) -> dict[str, int]:
    """FLOPs of the units of an epoch's work on one model at size² (meta device: no memory, no time): a guided
    U-Net call for one image (cond+uncond batched), a training step for one image (that call's forward and its
    backward to the conditioning; weights need no gradient), one image's VAE decode, one prompt through the text
    encoder(s) with its backward to the input embeddings (the LoRA's own products are negligible). Attention is
    PyTorch's SDPA (the count needs no memory heuristics); every variant does the same products."""
    import comfy.ldm.modules.diffusionmodules.model as vae_blocks
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch = env["torch"]
    meta = torch.device("meta")
    model, clip = build(env, model_key, "fp32", tiny, meta=True)
    unet = model.model.diffusion_model
    for p in unet.parameters():
        p.requires_grad_(False)
    h = size // 8
    x, t = torch.zeros(2, 4, h, h, device=meta), torch.zeros(2, device=meta)
    unet_config = model.model.model_config.unet_config
    adm = unet_config.get("adm_in_channels")
    extra = {"y": torch.zeros(2, adm, device=meta)} if adm else {}
    context = torch.zeros(2, 77, unet_config["context_dim"], device=meta)
    with torch.no_grad():
        call = count_flops(lambda: unet(x, t, context=context, **extra))
    leaf = context.clone().requires_grad_(True)
    train = count_flops(lambda: unet(x, t, context=leaf, **extra).sum().backward())

    with meta:
        vae = AutoencoderKL(ddconfig=dict(_tiny_models().TINY_VAE if tiny else SD_VAE), embed_dim=4)
    for m in vae.modules():
        if hasattr(m, "optimized_attention"):
            m.optimized_attention = vae_blocks.pytorch_attention
    with torch.no_grad():
        decode = count_flops(lambda: vae.decode(torch.zeros(1, 4, h, h, device=meta)))

    encoders = [getattr(clip.cond_stage_model, name) for name in ("clip_l", "clip_g")
                if hasattr(clip.cond_stage_model, name)]

    out_of_place = env["comfy_host"]._OUT_OF_PLACE  # the training pass's forwards (ComfyUI's CLIP adds in place)
    for m in clip.cond_stage_model.modules():
        for kind, forward in out_of_place.items():
            if isinstance(m, kind):
                m.forward = types.MethodType(forward, m)

    def encode():
        for enc in encoders:
            emb = enc.transformer.get_input_embeddings()
            emb.weight.requires_grad_(True)
            out = enc.transformer(torch.zeros(1, 77, dtype=torch.long, device=meta))[0]
            out.sum().backward()

    return {"call": call, "train": train, "decode": decode, "encode": count_flops(encode)}


def _tiny_models():
    return _load("texforce_test_nodes", REPO / "tests" / "comfy_nodes" / "texforce_test_nodes",
                 package=True).tiny_models


def main_flops(args) -> dict[str, Any]:
    """How much of bench_train.py's epoch (its CONFIG at each model's native size) is U-Net work, VAE decode and
    text encoder: the lowest end-to-end ratio to the U-Net floors any trainer can reach is 1 + the other two's
    shares; with --work-ratio (bench_train's measured total / work floor) the projected ratio at full size."""
    env = setup("cpu", "pytorch", args.verbose)
    bt = _load("texforce_bench_train", REPO / "bench" / "bench_train.py")
    c = bt.CONFIG
    images, steps = c["images_per_epoch"], c["num_steps"]
    K = env["config"].train_timesteps(env["config"].make_config("texforce", **c))
    per_step = c["train_batch_size"] * c["gradient_accumulation_steps"]
    encodes = math.ceil(images / per_step) * (min(per_step, len(bt.PROMPTS)) + 1)  # distinct prompts + negative
    print(f"TexForce epoch work by FLOPs (meta device): bench_train's config, {images} images, {steps} steps with "
          f"CFG, K={K} trained timesteps, {encodes} prompt encodings (forward+backward) per epoch")
    head = (f"{'model':14s} {'size':>5s} {'GFLOP call':>11s} {'train step':>11s} {'decode':>9s} {'encode':>8s} "
            f"{'U-Net epoch':>12s} {'decode %':>9s} {'encode %':>9s} {'lowest total':>13s}"
            + (f" {'projected':>10s}" if args.work_ratio else ""))
    print(head)
    print("-" * len(head))
    rows = []
    for key in args.models:
        size = model_size(key, args.tiny, args.size or (c["height"] if args.tiny else None))
        f = model_flops(env, key, args.tiny, size)
        unet_epoch = images * (steps * f["call"] + K * f["train"])
        dec, enc = images * f["decode"] / unet_epoch, encodes * f["encode"] / unet_epoch
        row = {"model": key, "tiny": args.tiny, "size": size, **{k + "_flops": v for k, v in f.items()},
               "decode_share": dec, "encode_share": enc, "lowest_total_ratio": 1 + dec + enc}
        if args.work_ratio:
            row["projected_total_ratio"] = args.work_ratio * (1 + dec + enc)
        rows.append(row)
        label = LABELS[key] + (" (tiny)" if args.tiny else "")
        print(f"{label:14s} {size:5d} {f['call'] / 1e9:11.1f} {f['train'] / 1e9:11.1f} {f['decode'] / 1e9:9.1f} "
              f"{f['encode'] / 1e9:8.1f} {unet_epoch / 1e12:10.1f} T {dec:9.1%} {enc:9.1%} {1 + dec + enc:12.3f}x"
              + (f" {row['projected_total_ratio']:9.3f}x" if args.work_ratio else ""))
    print("\nGFLOP per image: call = one guided U-Net call (cond+uncond), train step = its forward and backward to "
          "the conditioning, decode = one VAE decode, encode = one prompt's text-encoder forward and backward. "
          "lowest total = (U-Net + decode + encoder work) / U-Net work: bench_train's total / floor for a trainer "
          "that adds nothing." + (" projected = --work-ratio × lowest total (an upper estimate: the tiny model's "
                                  "per-call overheads are fixed costs that shrink against full-size calls)."
                                  if args.work_ratio else ""))
    return {"flops": rows}


def main() -> int:
    args = parse_args()
    if args.worker:
        return run_worker(json.loads(args.worker))
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_fullsize: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    out = main_flops(args) if args.flops else main_epoch(args, device) if args.epoch else main_rows(args, device)
    summary = {"bench": "texforce_fullsize", "device": device, "tiny": args.tiny, "batch": args.batch,
               "attention": args.attention, "torch": torch.__version__, **out}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
