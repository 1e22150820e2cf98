#!/usr/bin/env python3
"""Benchmark of the headless trainer on 1 and 2 processes (torchrun, gloo on CPUs), against compute floors.

Run with the project's venv, from the repository root:

    $(python3 scripts/comfy_host.py python) bench/bench_headless.py [--epochs 4] [--threads 1]

What it does:
1. writes the tiny learnable SD1 model as a single-file checkpoint + diffusers config (tests/diffusers_builders.py,
   the files the headless tests train on);
2. for N in 1, 2: launches N ranks with torch.distributed.run; every rank builds the DiffusersHost and a Trainer
   on the same global batch (CONFIG below), runs `--epochs` epochs (the first is warm-up, discarded), then
   measures its own compute floors on the same U-Net with the same shapes and number of calls as its share:
     sampling floor = (its images / sample batch) × num_steps no-grad U-Net calls on 2×batch (CFG batched);
     training floor = its trained timesteps × one forward + backward of the U-Net to the conditioning on
                      2×micro-batch (text encoder, log-prob, loss, all-reduce and optimizer not in the floor);
3. prints per-epoch sampling/training times (rank 0; every rank waits for the slowest at the all-reduces),
   their ratios to the floors (targets as for the ComfyUI host: sampling without the VAE decode ≤ 1.10×,
   training ≤ 1.25×), the
   speed-up of 2 processes over 1 and, last, a one-line JSON summary.

Each rank uses `--threads` threads, so 2 ranks × 1 thread against 1 rank × 1 thread is the scaling on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = dict(num_steps=10, timestep_fraction=0.5, images_per_epoch=16, images_per_prompt=2, sample_batch_size=4,
              train_batch_size=2, gradient_accumulation_steps=2, height=64, width=64, lora_rank=4, lora_alpha=4.0,
              lr=1e-3, advantage="batch", seed=0)
PROMPTS = ["a red apple", "a blue car", "a green tree", "a yellow sun", "a white horse", "a black cat"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warm-up (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--procs", default="1,2", help="process counts to run (default 1,2)")
    p.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "OUT_JSON"), help=argparse.SUPPRESS)
    return p.parse_args()


# ---------------------------------------------------------------------------------------------------- worker
def worker(model_dir: Path, out_json: Path, epochs: int, threads: int) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(threads)
    from training.config import make_config, train_timesteps
    from training.distributed import init_from_env
    from training.hosts.diffusers import DiffusersHost, load_pipeline
    from training.loop import Trainer

    dist = init_from_env()
    pipe = load_pipeline(model_dir / "tiny_sd1.safetensors", config=model_dir / "tiny_sd1_config")
    host = DiffusersHost(pipe, rank=4, alpha=4.0, seed=0)
    cfg = make_config("texforce", epochs=epochs, **CONFIG)
    trainer = Trainer(host, lambda im, p: im.mean(dim=(1, 2, 3)), PROMPTS, cfg, dist=dist)
    stats = trainer.run()[1:]

    # floors for this rank's share, same shapes and call counts
    unet, share = host.unet, cfg.images_per_epoch // dist.world_size
    c, h, w = host.latent_shape(cfg.height, cfg.width)
    ctx = torch.randn(2 * cfg.sample_batch_size, 77, unet.config.cross_attention_dim)
    K = train_timesteps(cfg)

    def sampling_floor() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(share // cfg.sample_batch_size):
                x = torch.randn(2 * cfg.sample_batch_size, c, h, w)
                for t in range(cfg.num_steps):
                    unet(x, torch.full((x.shape[0],), 500 - t), encoder_hidden_states=ctx)
        return time.perf_counter() - t0

    def training_floor() -> float:
        b = cfg.train_batch_size
        t0 = time.perf_counter()
        for _ in range(share // b):
            for _ in range(K):
                cond = torch.randn(2 * b, 77, ctx.shape[-1], requires_grad=True)
                out = unet(torch.randn(2 * b, c, h, w), torch.full((2 * b,), 400), encoder_hidden_states=cond).sample
                out.float().square().mean().backward()
        return time.perf_counter() - t0

    def decode_time() -> float:  # the VAE decode is in the sampling time but not in its floor
        t0 = time.perf_counter()
        for _ in range(share // cfg.sample_batch_size):
            host.decode(torch.randn(cfg.sample_batch_size, c, h, w))
        return time.perf_counter() - t0

    sampling_floor(), training_floor(), decode_time()  # warm-up
    floors = [(sampling_floor(), training_floor(), decode_time()) for _ in range(2)]
    result = {"rank": dist.rank, "world_size": dist.world_size, "threads": threads,
              "sampling_s": [s.seconds_sampling for s in stats], "training_s": [s.seconds_training for s in stats],
              "reward_s": [s.seconds_reward for s in stats],
              "sampling_floor_s": min(f[0] for f in floors), "training_floor_s": min(f[1] for f in floors),
              "decode_s": min(f[2] for f in floors)}
    if dist.is_main:
        out_json.write_text(json.dumps(result))
    dist.barrier()
    dist.close()


# ---------------------------------------------------------------------------------------------------- driver
def write_model(root: Path) -> None:
    """The tiny model files, written by a separate process that has ComfyUI importable (tests/conftest.py)."""
    code = ("import sys; sys.path.insert(0, %r); import conftest; from diffusers_builders import write_tiny_sd1; "
            "write_tiny_sd1(sys.argv[1], learnable=True)" % str(REPO / "tests"))
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, cwd=REPO, capture_output=True)


def launch(n: int, model_dir: Path, out: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--epochs", str(args.epochs), "--threads", str(args.threads), "--worker", str(model_dir), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{n}-process run failed:\n{proc.stderr[-4000:]}")
    return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - t0}


def main() -> int:
    args = parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.epochs, args.threads)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_model(root)
        results = {}
        for n in [int(x) for x in args.procs.split(",")]:
            results[n] = launch(n, root, root / f"r{n}.json", args)
    med = statistics.median
    print(f"headless trainer, tiny SD1, {CONFIG['images_per_epoch']} images × {CONFIG['num_steps']} steps, "
          f"{CONFIG['height']}², {args.threads} thread(s) per rank, median of {args.epochs - 1} epochs after warm-up")
    summary = {}
    for n, r in results.items():
        s, t = med(r["sampling_s"]), med(r["training_s"])
        row = {"procs": n, "epoch_s": s + t + med(r["reward_s"]), "sampling_s": s, "training_s": t,
               "sampling_ratio": s / r["sampling_floor_s"],
               "sampling_ratio_without_decode": (s - r["decode_s"]) / r["sampling_floor_s"],
               "training_ratio": t / r["training_floor_s"]}
        summary[n] = row
        print(f"  {n} process(es): epoch {row['epoch_s']:.3f} s | sampling {s:.3f} s = {row['sampling_ratio']:.2f}× "
              f"its floor {r['sampling_floor_s']:.3f} s ({row['sampling_ratio_without_decode']:.2f}× without the "
              f"{r['decode_s']:.3f} s VAE decode) | training {t:.3f} s = {row['training_ratio']:.2f}× its floor "
              f"{r['training_floor_s']:.3f} s")
    if 1 in summary and 2 in summary:
        speedup = summary[1]["epoch_s"] / summary[2]["epoch_s"]
        print(f"  2 processes: {speedup:.2f}× the throughput of 1 (ideal 2.00×; scaling efficiency {speedup / 2:.0%})")
        summary["speedup_2_over_1"] = speedup
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
