"""How much of a policy gradient is signal: the same gradient from independent batches, compared.

    <venv python> experiments/gradient_snr.py [--checkpoint F] [--batches 4] [--prompts 16] [--per-prompt 8]

At the base model (LoRA at its initialisation, ratio 1) the PPO gradient of a batch is g = −Σ A_i ∇log p_i, an
unbiased estimate of the true policy gradient G plus noise. For two independent batches E[g₁·g₂] = |G|², so
the mean pairwise cosine of the batches' gradients says how much of one batch's gradient is signal
(cos ≈ |G|² / (|G|² + noise²)): near 0, a step follows noise and a pretrained model drifts away from a good
point; clearly above 0, steps add up. Printed per advantage variant (how rewards become advantages) and per
DDIM step of the training window (which steps carry the signal). Gradients are linear in the advantages, so
every variant is the same per-step backward passes with different weights.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import time

import torch

from toy_common import REPO, load, pack_module, sampled_batch, trained_columns

log = logging.getLogger("texforce.experiments")


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    out = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return out.double()


def mean_cosine(vectors: list[torch.Tensor]) -> float:
    pairs = list(itertools.combinations(vectors, 2))
    return sum(float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in pairs) / len(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16, help="training prompts per batch")
    parser.add_argument("--per-prompt", type=int, default=8, help="images per prompt")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="gradient_snr")
    parser.add_argument("--phrasing", choices=("prompt", "rephrased"), default="prompt",
                        help="the training scenes' prompts, or their other phrasings (world.rephrased)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world, (model, clip, vae), mods = load(args.checkpoint)
    advantages = pack_module("training.advantages")
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    cfg = mods["make_config"]("fast", height=64, width=64, **overrides)
    host = mods["ComfyHost"](model, clip, vae, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
    train_prompts = ([s.prompt for s in world.training_scenes()] if args.phrasing == "prompt"
                     else world.rephrased(world.training_scenes()))
    trainer = mods["Trainer"](host, mods["ToyAlignmentReward"]("soft"), train_prompts, cfg)
    params = trainer.params
    variants = {
        "group z-score (soft)": lambda soft, strict, p: advantages.group_advantages(soft, p),
        "group_mean (soft)": lambda soft, strict, p: advantages.group_mean_advantages(soft, p),
        "group_mean (strict)": lambda soft, strict, p: advantages.group_mean_advantages(strict, p),
        "batch z-score (soft)": lambda soft, strict, p: advantages.batch_advantages(soft),
    }
    gen = torch.Generator().manual_seed(7)
    grads = {name: [] for name in variants}  # per variant: per batch, (W, P) per-step gradients
    t0 = time.time()
    for b in range(args.batches):
        prompts, traj = sampled_batch(trainer, train_prompts, gen, args.prompts, args.per_prompt, 1000 + 97 * b)
        soft = traj.rewards.float()
        strict = world.alignment(traj.images, prompts, strict=True)
        log.info("batch %d: soft %.4f, all-correct %.3f, groups with a wrong image %d of %d (%.0f s)", b,
                 float(soft.mean()), float(strict.mean()),
                 sum(float(strict[i:i + args.per_prompt].min()) < 1 for i in range(0, len(prompts), args.per_prompt)),
                 args.prompts, time.time() - t0)
        per_variant = {name: [] for name in variants}
        for j in range(trainer.cfg.sde_steps or trainer.W):
            columns = trained_columns(trainer, traj, j)
            for name, make in variants.items():
                traj.advantages = make(soft, strict, prompts)
                with torch.inference_mode(False), host.training(), torch.enable_grad():
                    trainer.backward_microbatch(traj, torch.arange(len(prompts)), columns, 1.0 / len(prompts))
                per_variant[name].append(flat_grad(params))
        for name in variants:
            grads[name].append(torch.stack(per_variant[name]))
        log.info("batch %d: gradients done (%.0f s)", b, time.time() - t0)
    result = {}
    for name, batches in grads.items():
        total = mean_cosine([g.sum(0) for g in batches])
        per_step = [mean_cosine([g[j] for g in batches]) for j in range(len(batches[0]))]
        norm = float(torch.stack([g.sum(0).norm() for g in batches]).mean())
        result[name] = {"cosine": total, "per_step": per_step, "norm": norm}
        log.info("%-22s cosine between batches %+.3f (|g| %.3g); per step %s", name, total, norm,
                 " ".join(f"{c:+.2f}" for c in per_step))
    out = REPO / "experiments" / "results" / f"{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "overrides": overrides, "batches": args.batches,
                               "images_per_batch": args.prompts * args.per_prompt, "variants": result}, indent=1))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
