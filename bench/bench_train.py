#!/usr/bin/env python3
"""Benchmark of one TexForce training configuration on the tiny learnable model, against its compute floors.

Run with the project's ComfyUI venv (built by scripts/comfy_host.py), from the repository root:

    $(python3 scripts/comfy_host.py python) bench/bench_train.py [--threads N] [--epochs 6] [--repeats 2]

What it does, all in one process on the same model objects:
1. builds the tiny v-prediction MODEL, SD1 CLIP and VAE under torch.inference_mode() (as ComfyUI's nodes do),
   a ComfyHost on them and a Trainer with the fixed configuration CONFIG below;
2. runs `--epochs` epochs; the first is warm-up and discarded. Sampling time is the Trainer's seconds_sampling
   (excludes reward time; includes encoding and the VAE decode, which is timed separately), training time its
   seconds_training;
3. measures the compute floors on the same U-Net module, with the same batch shapes and number of calls, after
   a warm-up, `--repeats` times after every measured epoch (interleaved, so that load from other processes
   moves epochs and floors alike; ratios are the median of the per-epoch ratios):
     sampling floor = images_per_epoch × num_steps guided evaluations: (images / sample batch) × num_steps
                      calls of `model.model.diffusion_model` on 2×batch (cond+uncond batched as ComfyUI does),
                      under no_grad;
     training floor = per trained timestep one forward + backward of the U-Net to its conditioning (the context
                      requires grad, the U-Net weights do not), on 2×train batch, × trained timesteps per epoch.
                      The weights are a non-inference copy of the same U-Net (ComfyUI loads weights as
                      inference tensors, which autograd cannot save for backward). The text encoder, the DDIM
                      log-prob, the loss and the optimizer are NOT in the floor (the encoder's forward+backward
                      per optimizer step is reported separately);
     total floor    = the two floors' sum: the whole epoch (sampling with its VAE decode, the reward, training)
                      against it is the end-to-end ratio (issue 14's measure: the decode is in the epoch, not the
                      floor);
     decode floor   = the bare autoencoder's decode (`vae.first_stage_model.decode`) of the epoch's sampling
                      batches, under no_grad;
     work floor     = total floor + decode floor + the text encoder's forward+backward per optimizer step (through
                      the host, LoRA included): the compute no trainer can skip. The epoch against it is what the
                      trainer's own code adds. On the tiny model the decode and the encoder weigh far more against
                      the U-Net than at full size; `bench/bench_fullsize.py --flops` counts their shares there;
4. runs one more, instrumented, epoch that shows where sampling and training time goes (encode, predictor
   set-up, U-Net calls through ComfyUI's sampling_function, DDIM step, backward, decode, optimizer);
5. prints the numbers, the ratios to the floors (targets: sampling ≤ 1.10×, training ≤ 1.25×, total ≤ 1.10×),
   peak memory (max RSS; CUDA max allocated when on CUDA) and, last, a one-line JSON summary.

The device is ComfyUI's choice (comfy.model_management); `--cpu` forces the CPU. On CUDA every measured region
is synchronised. Other processes on the same CPU move the absolute times a lot; the interleaved ratios less.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import importlib
import importlib.util
import io
import json
import logging
import os
import platform
import pstats
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "texforce_pack"
PROMPTS = ["a red apple", "a blue car", "a green tree", "a yellow sun"]

# The one configuration this benchmark measures (an epoch takes a few seconds on 2 CPU cores).
CONFIG = dict(num_steps=10, timestep_fraction=0.5, images_per_epoch=16, images_per_prompt=4,
              sample_batch_size=8, train_batch_size=4, gradient_accumulation_steps=2, height=64, width=64,
              advantage="batch", lora_rank=16, lora_alpha=16.0, guidance=5.0, eta=1.0, seed=0)
TARGET_SAMPLING = 1.10
TARGET_TRAINING = 1.25
TARGET_TOTAL = 1.10  # sampling + decode + reward + training against the floors' sum (issue 14)
MAX_FLOOR_SPREAD = 1.3  # slowest / fastest floor repeat above this: the device was shared (noisy results)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6, help="epochs to run; the first is warm-up (default 6)")
    p.add_argument("--repeats", type=int, default=2,
                   help="repeats of each floor after every measured epoch (median; default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--cpu", action="store_true", help="force the CPU even when ComfyUI would pick a GPU")
    p.add_argument("--no-breakdown", action="store_true", help="skip the instrumented breakdown epoch")
    p.add_argument("--cprofile", metavar="FILE", help="also cProfile one more epoch, write FILE, print the top")
    p.add_argument("--verbose", action="store_true", help="show ComfyUI's and the trainer's INFO logs")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first one is warm-up)")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------
# Set-up: ComfyUI on sys.path, the pack as `texforce_pack`, the test-only tiny models (as tests/conftest.py)
# ----------------------------------------------------------------------------------------------
def _load(name: str, path: Path, package: bool = False):
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py" if package else path, submodule_search_locations=[str(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def setup(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    comfy_host = _load("texforce_comfy_host", REPO / "scripts" / "comfy_host.py")
    comfy_dir = Path(os.environ.get("TEXFORCE_COMFY_DIR") or comfy_host.comfy_dir())
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    if args.cpu or not has_accelerator:
        comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
    import comfy.model_management as mm

    pack = _load(PACK_NAME, REPO, package=True)
    tiny_models = _load("texforce_test_nodes", REPO / "tests" / "comfy_nodes" / "texforce_test_nodes",
                        package=True).tiny_models
    return {
        "torch": torch, "mm": mm, "pack": pack, "tiny_models": tiny_models,
        "ComfyHost": importlib.import_module(f"{PACK_NAME}.training.hosts.comfy").ComfyHost,
        "loop": importlib.import_module(f"{PACK_NAME}.training.loop"),
        # the DDIM schedule whose `step` sampling (the chain) and update (the training pass) call
        "ddim": importlib.import_module(f"{PACK_NAME}.training.ddim"),
        "config": importlib.import_module(f"{PACK_NAME}.training.config"),
    }


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
class Clock:
    """perf_counter that synchronises the accelerator first (CUDA kernels are asynchronous)."""

    def __init__(self, torch, device):
        self.cuda = device.type == "cuda"
        self.torch = torch

    def __call__(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()


def brightness(images, prompts):
    """The reward: mean pixel value (cheap; reward time is excluded from seconds_sampling anyway)."""
    return images.mean(dim=(1, 2, 3))


def wrapped_modules(module) -> int:
    """How many comfy-op modules currently carry weight/bias wrappers (they copy the weight on every call)."""
    return sum(1 for m in module.modules()
               if getattr(m, "weight_function", None) or getattr(m, "bias_function", None))


def peak_memory(torch, device) -> dict[str, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    out = {"peak_rss_mib": round(rss_mib, 1)}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def sampling_batches(cfg) -> list[int]:
    n, bs = cfg.images_per_epoch, cfg.sample_batch_size
    return [min(bs, n - s) for s in range(0, n, bs)]


def training_microbatches(cfg) -> list[int]:
    n, bs = cfg.images_per_epoch, cfg.train_batch_size
    return [min(bs, n - s) for s in range(0, n, bs)] * cfg.num_inner_epochs


# ----------------------------------------------------------------------------------------------
# Compute floors
# ----------------------------------------------------------------------------------------------
def unet_inputs(env, host, cfg, unet_device, b: int, seed: int):
    """x (2b, C, h, w), t (2b,), context (2b, L, D): the shapes sampling_function hands the U-Net."""
    torch = env["torch"]
    g = torch.Generator().manual_seed(seed)
    shape = host.latent_shape(cfg.height, cfg.width)
    with torch.inference_mode(False), torch.no_grad():
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        cond = host.encode(prompts)["cross_attn"]
        uncond = host.encode([cfg.negative_prompt])["cross_attn"].expand(b, -1, -1)
        context = torch.cat([cond, uncond]).to(unet_device)
    x = torch.randn((2 * b, *shape), generator=g).to(unet_device)
    t = (torch.randint(1, 1000, (b,), generator=g).float().repeat(2)).to(unet_device)
    return x, t, context


class Floors:
    """The compute floors of one epoch, measured on prepared inputs; each call of a measure_* method is one repeat."""

    def __init__(self, env, host, cfg, clock, unet, twin, K: int, autoencoder=None):
        torch = env["torch"]
        self.torch, self.cfg, self.clock, self.unet, self.twin, self.K = torch, cfg, clock, unet, twin, K
        self.autoencoder = autoencoder  # the VAE's bare module (first_stage_model): the decode floor, when given
        self.split = not clock.cuda  # per-call forward/backward split (would add syncs on CUDA)
        self.sample_batches, self.micro = sampling_batches(cfg), training_microbatches(cfg)
        dev = next(unet.parameters()).device
        self.sample_inputs = {b: unet_inputs(env, host, cfg, dev, b, seed=b) for b in set(self.sample_batches)}
        self.train_inputs = {}
        with torch.inference_mode(False), torch.enable_grad():
            for b in set(self.micro):
                x, t, c = unet_inputs(env, host, cfg, dev, b, seed=100 + b)
                leaf = c.detach().clone().requires_grad_(True)
                out = twin(x, t, context=leaf)
                grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(b)).to(out.device, out.dtype)
                self.train_inputs[b] = (x, t, leaf, grad)
        self.latents = {}  # the decode floor's inputs, on the autoencoder's device and in its dtype
        if autoencoder is not None:
            shape, ae = host.latent_shape(cfg.height, cfg.width), next(autoencoder.parameters())
            self.latents = {b: torch.randn((b, *shape), generator=torch.Generator().manual_seed(200 + b)).to(
                ae.device, ae.dtype) for b in set(self.sample_batches)}
        self.sampling: list[float] = []
        self.training: list[float] = []
        self.decode: list[float] = []
        self.forward: list[float] = []  # per call, seconds (CPU only)
        self.backward: list[float] = []
        self.measure_sampling(keep=False)  # warm-up
        self.measure_training(keep=False)
        if autoencoder is not None:
            self.measure_decode(keep=False)

    def measure_decode(self, keep: bool = True) -> float:
        """The epoch's VAE decode on the bare autoencoder (what ComfyUI's VAE.decode runs, without its memory
        bookkeeping, output moves and clamping): one call per sampling batch, under no_grad."""
        torch = self.torch
        with torch.inference_mode(False), torch.no_grad():
            t0 = self.clock()
            for b in self.sample_batches:
                self.autoencoder.decode(self.latents[b])
            dt = self.clock() - t0
        if keep:
            self.decode.append(dt)
        return dt

    def measure_sampling(self, keep: bool = True) -> float:
        """images_per_epoch × num_steps guided evaluations: bare U-Net forwards on 2×batch under no_grad."""
        torch, unet = self.torch, self.unet
        with torch.inference_mode(False), torch.no_grad():
            t0 = self.clock()
            for b in self.sample_batches:
                x, t, c = self.sample_inputs[b]
                for _ in range(self.cfg.num_steps):
                    unet(x, t, context=c)
            dt = self.clock() - t0
        if keep:
            self.sampling.append(dt)
        return dt

    def measure_training(self, keep: bool = True) -> float:
        """Per trained timestep one U-Net forward + backward to the context (weights need no gradient)."""
        torch, twin, clock = self.torch, self.twin, self.clock
        fwd = bwd = 0.0
        with torch.inference_mode(False), torch.enable_grad():
            t0 = clock()
            for b in self.micro:
                x, t, leaf, grad = self.train_inputs[b]
                for _ in range(self.K):
                    if self.split:
                        ta = time.perf_counter()
                        out = twin(x, t, context=leaf)
                        tb = time.perf_counter()
                        out.backward(grad)
                        fwd, bwd = fwd + tb - ta, bwd + time.perf_counter() - tb
                    else:
                        twin(x, t, context=leaf).backward(grad)
            dt = clock() - t0
            for _, _, leaf, _ in self.train_inputs.values():
                leaf.grad = None
        if keep:
            self.training.append(dt)
            if self.split:
                n = len(self.micro) * self.K
                self.forward.append(fwd / n)
                self.backward.append(bwd / n)
        return dt


def non_inference_copy(env, unet):
    """A copy of the U-Net whose weights are ordinary tensors with requires_grad=False and no weight wrappers."""
    torch = env["torch"]
    with torch.inference_mode(False), torch.no_grad():
        twin = copy.deepcopy(unet)
        for m in twin.modules():
            if hasattr(m, "weight_function"):
                m.weight_function, m.bias_function = [], []
        for p in twin.parameters():
            p.requires_grad_(False)
    bad = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_inference()]
    if bad:
        raise RuntimeError(f"the U-Net copy still holds inference tensors: {bad[:3]}")
    return twin


# ----------------------------------------------------------------------------------------------
# Instrumented epoch: where the time goes
# ----------------------------------------------------------------------------------------------
class Breakdown:
    """Times host/trainer calls for one epoch by monkeypatching *instance* attributes (restored afterwards)."""

    def __init__(self, env, host, trainer, clock, unet):
        self.env, self.host, self.trainer, self.clock, self.unet = env, host, trainer, clock, unet
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}
        self.each: dict[str, list[float]] = {}
        self.wrapped_during_sampling: int | None = None
        self.wrapped_during_training: int | None = None
        self._undo: list[Callable[[], None]] = []

    def add(self, key: str, dt: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + dt
        self.n[key] = self.n.get(key, 0) + 1
        self.each.setdefault(key, []).append(dt)

    def phase(self) -> str:
        return "train" if self.env["torch"].is_grad_enabled() else "sample"

    def timed(self, key_fn: Callable[[], str], fn: Callable) -> Callable:
        def inner(*a, **kw):
            t0 = self.clock()
            try:
                return fn(*a, **kw)
            finally:
                self.add(key_fn(), self.clock() - t0)
        return inner

    def _patch(self, obj, name: str, new) -> None:
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, new)
        self._undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def __enter__(self):
        torch, host, tr, loop = self.env["torch"], self.host, self.trainer, self.env["loop"]
        unet = self.unet  # the shared U-Net module: which wrappers are on it during the epoch
        self._patch(host, "encode", self.timed(lambda: f"{self.phase()}.encode", host.encode))
        self._patch(host, "decode", self.timed(lambda: "sample.decode", host.decode))
        orig_predictor = host.predictor

        @contextlib.contextmanager
        def predictor(*a, **kw):
            ph = self.phase()
            with orig_predictor(*a, **kw) as predict:
                first = [True]

                def timed_predict(x, t):
                    t0 = self.clock()
                    out = predict(x, t)
                    dt = self.clock() - t0
                    if first[0]:  # includes prepare(): load_models_gpu, convert_cond, process_conds, pre_run
                        first[0] = False
                        self.add(f"{ph}.predict_first", dt)
                        n = wrapped_modules(unet)
                        if ph == "sample":
                            self.wrapped_during_sampling = n
                        else:
                            self.wrapped_during_training = n
                    else:
                        self.add(f"{ph}.predict", dt)
                    return out

                t_exit = [0.0]
                try:
                    yield timed_predict
                finally:
                    t_exit[0] = self.clock()
            self.add(f"{ph}.predictor_cleanup", self.clock() - t_exit[0])

        self._patch(host, "predictor", predictor)
        schedule = self.env["ddim"].DDIMSchedule
        orig_step = schedule.step
        self._undo.append(lambda: setattr(schedule, "step", orig_step))
        schedule.step = self.timed(lambda: f"{self.phase()}.ddim_step", orig_step)
        self._patch(tr, "_optimizer_step", self.timed(lambda: "train.optimizer_step", tr._optimizer_step))
        orig_backward = torch.autograd.backward

        def backward(tensors, *a, **kw):
            key = "train.backward_encoder" if isinstance(tensors, (list, tuple)) else "train.backward_unet"
            t0 = self.clock()
            try:
                return orig_backward(tensors, *a, **kw)
            finally:
                self.add(key, self.clock() - t0)

        self._undo.append(lambda: setattr(torch.autograd, "backward", orig_backward))
        torch.autograd.backward = backward
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        return False


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def fmt(xs: list[float], unit: float = 1.0, digits: int = 3) -> str:
    return ", ".join(f"{x * unit:.{digits}f}" for x in xs)


def time_decode(host, clock) -> list[float]:
    """Wrap host.decode (an instance attribute, undone by `del host.decode`) so every call's seconds are appended
    to the returned list."""
    times: list[float] = []
    decode = host.decode

    def timed_decode(latents):
        t0 = clock()
        try:
            return decode(latents)
        finally:
            times.append(clock() - t0)

    host.decode = timed_decode
    return times


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    env = setup(args)
    torch, mm, loop, config = env["torch"], env["mm"], env["loop"], env["config"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = mm.get_torch_device()
    clock = Clock(torch, device)
    tiny = env["tiny_models"]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    with torch.inference_mode():  # as ComfyUI's nodes run: weights are inference tensors
        model = tiny.tiny_model(0, True, v_prediction=True, output_gain=20)
        clip, vae = tiny.tiny_clip("sd1", 0, True), tiny.tiny_vae(0, True)
        host = env["ComfyHost"](model, clip, vae, rank=CONFIG["lora_rank"], alpha=CONFIG["lora_alpha"], seed=0)
    extra = (0 if args.no_breakdown else 1) + (1 if args.cprofile else 0)
    cfg = config.make_config("texforce", epochs=args.epochs + extra, **CONFIG)
    trainer = loop.Trainer(host, brightness, PROMPTS, cfg)
    K = config.train_timesteps(cfg)
    n_sample_calls = len(sampling_batches(cfg)) * cfg.num_steps
    n_train_steps = len(training_microbatches(cfg)) * K

    print(f"TexForce training benchmark: torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{load_before if load_before is None else round(load_before, 2)}")
    print(f"config: {cfg.images_per_epoch} images/epoch of {cfg.width}x{cfg.height} "
          f"(latent {host.latent_shape(cfg.height, cfg.width)}), {cfg.num_steps} steps, timestep_fraction "
          f"{cfg.timestep_fraction} (K={K}), sample batch {cfg.sample_batch_size}, train batch "
          f"{cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps}, LoRA r{cfg.lora_rank}, "
          f"guidance {cfg.guidance}")
    print(f"work per epoch: {n_sample_calls} guided U-Net calls for sampling (batch 2x{cfg.sample_batch_size}), "
          f"{n_train_steps} U-Net forward+backward for training (batch 2x{cfg.train_batch_size})")

    # VAE decode is timed in every epoch (VAE.decode returns CPU tensors: synchronous anyway).
    decode_times = time_decode(host, clock)

    def run_epoch(label: str) -> dict[str, float]:
        decode_times.clear()
        s = trainer.run(trainer.epoch + 1)[0]
        e = {"sampling": s.seconds_sampling, "training": s.seconds_training, "decode": sum(decode_times),
             "reward": s.seconds_reward, "reward_mean": s.reward_mean}
        e["total"] = e["sampling"] + e["reward"] + e["training"]  # seconds_sampling includes the decode
        print(f"  epoch {trainer.epoch}{label}: sampling {e['sampling']:.3f}s (decode {e['decode']:.3f}s), "
              f"training {e['training']:.3f}s, reward {e['reward_mean']:.4f}", end="", flush=True)
        return e

    # 1. warm-up: one epoch, then the floors' own warm-up. The floors use the same U-Net module: the user's
    #    patcher is loaded first, so the module carries none of the host's weight wrappers.
    run_epoch(" (warm-up)")
    print()
    mm.load_models_gpu([model, vae.patcher])
    unet = model.model.diffusion_model
    twin = non_inference_copy(env, unet)
    floors = Floors(env, host, cfg, clock, unet, twin, K, autoencoder=vae.first_stage_model)

    # The text encoder's cost per optimizer step (forward + backward to the LoRA, through the host), as the trainer
    # encodes them: the step's distinct prompts (at most this many) and the negative prompt.
    step_prompts = min(cfg.train_batch_size * cfg.gradient_accumulation_steps, len(PROMPTS))

    def encoder_step() -> float:
        prompts = PROMPTS[:step_prompts]
        with torch.inference_mode(False), host.training(), torch.enable_grad():
            t0 = clock()
            cond, uncond = host.encode(prompts), host.encode([cfg.negative_prompt])
            (cond["cross_attn"].square().mean() + uncond["cross_attn"].square().mean()).backward()
            dt = clock() - t0
        for p in host.trainable_parameters():
            p.grad = None
        return dt

    encoder_step()
    enc = statistics.median(encoder_step() for _ in range(5))
    enc_epoch = enc * (len(training_microbatches(cfg)) // cfg.gradient_accumulation_steps)  # × optimizer steps

    # 2. measured epochs, each followed by `repeats` repeats of both floors (interleaved, so that a machine
    #    that gets busier or quieter during the run moves epochs and floors alike)
    epochs, pairs_s, pairs_t, pairs_total, pairs_work, wrapped = [], [], [], [], [], 0
    for _ in range(args.epochs - 1):
        e = run_epoch("")
        mm.load_models_gpu([model, vae.patcher])
        wrapped = max(wrapped, wrapped_modules(unet))
        fs = statistics.median(floors.measure_sampling() for _ in range(args.repeats))
        ft = statistics.median(floors.measure_training() for _ in range(args.repeats))
        fd = statistics.median(floors.measure_decode() for _ in range(args.repeats))
        print(f"   | floors: sampling {fs:.3f}s, training {ft:.3f}s, decode {fd:.3f}s")
        epochs.append(e)
        pairs_s.append((e["sampling"], e["decode"], fs))
        pairs_t.append((e["training"], ft))
        pairs_total.append((e["total"], fs + ft))
        pairs_work.append((e["total"], fs + ft + fd + enc_epoch))

    sampling = statistics.median(e["sampling"] for e in epochs)
    training = statistics.median(e["training"] for e in epochs)
    decode_s = statistics.median(e["decode"] for e in epochs)
    f_sample, f_train = statistics.median(floors.sampling), statistics.median(floors.training)
    r_sample = statistics.median(s / f for s, _, f in pairs_s)
    r_sample_nodec = statistics.median((s - d) / f for s, d, f in pairs_s)
    r_train = statistics.median(t / f for t, f in pairs_t)
    total = statistics.median(e["total"] for e in epochs)
    reward_s = statistics.median(e["reward"] for e in epochs)
    r_total = statistics.median(t / f for t, f in pairs_total)
    f_decode = statistics.median(floors.decode)
    r_work = statistics.median(t / f for t, f in pairs_work)

    # 3. breakdown epoch
    del host.decode
    parts: dict[str, Any] = {}
    if not args.no_breakdown:
        with Breakdown(env, host, trainer, clock, unet) as bd:
            s = trainer.run(trainer.epoch + 1)[0]
        parts = {k: {"s": v, "calls": bd.n[k], "median": statistics.median(bd.each[k])}
                 for k, v in sorted(bd.t.items())}
        parts["_epoch"] = {"sampling": s.seconds_sampling, "training": s.seconds_training}
        parts["_wrapped_unet_modules"] = {"sampling": bd.wrapped_during_sampling,
                                          "training": bd.wrapped_during_training}

    # 4. optional cProfile of one more epoch
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        trainer.run(trainer.epoch + 1)
        prof.disable()
        prof.dump_stats(args.cprofile)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        print(f"\ncProfile of one epoch (top 25 by tottime; full profile in {args.cprofile}):")
        print(buf.getvalue())

    mem = peak_memory(torch, device)

    def verdict(r: float, target: float) -> str:
        return "met" if r <= target else "MISSED"

    print(f"\nresults: median of {len(epochs)} measured epochs; floors: median of {len(floors.sampling)} repeats "
          f"interleaved with them; ratios: median of the per-epoch ratios to the adjacent floors")
    print(f"  sampling per epoch      {sampling:8.3f} s   (epochs: {fmt([s for s, _, _ in pairs_s])}; VAE decode "
          f"{decode_s:.3f} s of it, not in the floor)")
    print(f"  sampling floor          {f_sample:8.3f} s   ({n_sample_calls} bare U-Net forwards, batch "
          f"2x{cfg.sample_batch_size}, no_grad: {f_sample / n_sample_calls * 1e3:.2f} ms each; "
          f"repeats: {fmt(floors.sampling)})")
    print(f"  sampling / floor        {r_sample:8.3f} x   target <= {TARGET_SAMPLING}: "
          f"{verdict(r_sample, TARGET_SAMPLING)}  (per epoch: {fmt([s / f for s, _, f in pairs_s])})")
    print(f"    without VAE decode    {r_sample_nodec:8.3f} x   target <= {TARGET_SAMPLING}: "
          f"{verdict(r_sample_nodec, TARGET_SAMPLING)}  (per epoch: "
          f"{fmt([(s - d) / f for s, d, f in pairs_s])})")
    print(f"  training per epoch      {training:8.3f} s   (epochs: {fmt([t for t, _ in pairs_t])})")
    split = ""
    if floors.forward:
        split = (f"; forward {statistics.median(floors.forward) * 1e3:.2f} + backward "
                 f"{statistics.median(floors.backward) * 1e3:.2f} ms")
    print(f"  training floor          {f_train:8.3f} s   ({n_train_steps} U-Net forward+backward to the context, "
          f"batch 2x{cfg.train_batch_size}: {f_train / n_train_steps * 1e3:.2f} ms each{split}; "
          f"repeats: {fmt(floors.training)})")
    print(f"  training / floor        {r_train:8.3f} x   target <= {TARGET_TRAINING}: "
          f"{verdict(r_train, TARGET_TRAINING)}  (per epoch: {fmt([t / f for t, f in pairs_t])})")
    print(f"  text encoder fwd+bwd    {enc_epoch:8.3f} s   per epoch at most, encoded once per optimizer step, in the "
          f"training time but not in the floor ({enc * 1e3:.1f} ms for {step_prompts} prompts + the negative prompt, "
          "measured alone)")
    print(f"  total per epoch         {total:8.3f} s   (sampling with decode, reward {reward_s:.3f} s, training; "
          f"epochs: {fmt([t for t, _ in pairs_total])})")
    print(f"  total floor             {f_sample + f_train:8.3f} s   (sampling floor + training floor)")
    print(f"  total / floor           {r_total:8.3f} x   target <= {TARGET_TOTAL}: {verdict(r_total, TARGET_TOTAL)}  "
          f"(per epoch: {fmt([t / f for t, f in pairs_total])})")
    print(f"  decode floor            {f_decode:8.3f} s   (the bare autoencoder's decode of the epoch's "
          f"{len(floors.sample_batches)} batches; repeats: {fmt(floors.decode)})")
    print(f"  work floor              {f_sample + f_train + f_decode + enc_epoch:8.3f} s   (U-Net floors + decode "
          f"floor + text encoder: the compute an epoch cannot skip; decode {f_decode / (f_sample + f_train):.1%} and "
          f"encoder {enc_epoch / (f_sample + f_train):.1%} of the U-Net floors on this tiny model)")
    print(f"  total / work floor      {r_work:8.3f} x   what the trainer adds to the work  (per epoch: "
          f"{fmt([t / f for t, f in pairs_work])}); at full size: bench/bench_fullsize.py --flops")
    print(f"  training / sampling     {training / sampling:8.3f} x")
    print(f"  peak memory             {', '.join(f'{k} {v}' for k, v in mem.items())}")
    if wrapped:
        print(f"  WARNING: {wrapped} U-Net modules carried weight wrappers during the sampling floor")
    spread = max(max(xs) / min(xs) for xs in (floors.sampling, floors.training, floors.decode))
    if spread > 2 * MAX_FLOOR_SPREAD:
        print(f"  WARNING: floor repeats differ by up to {spread:.2f}x: something else was using the device heavily; "
              "these numbers are unreliable, run again on a quiet machine")
    elif spread > MAX_FLOOR_SPREAD:
        print(f"  NOTE: floor repeats differ by up to {spread:.2f}x (quiet machine: < {MAX_FLOOR_SPREAD}x): the device "
              "was shared; absolute times are noisy, the per-epoch paired ratios less so")
    if load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        print(f"  NOTE: the machine was busy before the run (load average {load_before:.2f}): absolute times are "
              "noisy; the interleaved ratios less so")
    if parts:
        print("\nbreakdown of one instrumented epoch (seconds total, calls, median ms per call):")
        for key, v in parts.items():
            if not key.startswith("_"):
                print(f"  {key:28s} {v['s']:8.4f}  x{v['calls']:<4d} {v['median'] * 1e3:8.2f}")
        ep = parts["_epoch"]
        known_s = sum(v["s"] for k, v in parts.items() if k.startswith("sample."))
        known_t = sum(v["s"] for k, v in parts.items() if k.startswith("train."))
        print(f"  {'sample.other':28s} {ep['sampling'] - known_s:8.4f}  (noise, latent stacking, loop; "
              f"epoch sampling {ep['sampling']:.4f})")
        print(f"  {'train.other':28s} {ep['training'] - known_t:8.4f}  (indexing, loss, loop; "
              f"epoch training {ep['training']:.4f})")
        print(f"  floor per call: sampling forward {f_sample / n_sample_calls * 1e3:.2f} ms{split}")
        print(f"  U-Net modules with weight wrappers during the epoch: {parts['_wrapped_unet_modules']}")

    summary = {
        "bench": "texforce_train", "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "config": dict(CONFIG), "epochs_measured": len(epochs),
        "floor_repeats": len(floors.sampling), "floor_spread": round(spread, 3),
        "sampling_s": round(sampling, 4), "sampling_floor_s": round(f_sample, 4),
        "sampling_ratio": round(r_sample, 3), "sampling_ratio_without_decode": round(r_sample_nodec, 3),
        "decode_s": round(decode_s, 4), "training_s": round(training, 4), "training_floor_s": round(f_train, 4),
        "training_ratio": round(r_train, 3), "reward_s": round(reward_s, 4), "total_s": round(total, 4),
        "total_floor_s": round(f_sample + f_train, 4), "total_ratio": round(r_total, 3),
        "text_encoder_s": round(enc_epoch, 4), "decode_floor_s": round(f_decode, 4),
        "work_floor_s": round(f_sample + f_train + f_decode + enc_epoch, 4), "work_ratio": round(r_work, 3),
        "targets": {"sampling": TARGET_SAMPLING, "training": TARGET_TRAINING, "total": TARGET_TOTAL},
        "met": {"sampling": r_sample <= TARGET_SAMPLING, "sampling_without_decode": r_sample_nodec <= TARGET_SAMPLING,
                "training": r_train <= TARGET_TRAINING, "total": r_total <= TARGET_TOTAL},
        **mem, "load_average_before": load_before,
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
