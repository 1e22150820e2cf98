"""Is there a direction in which the text-encoder LoRA raises the reward, and how far along it does the gain hold?

    <venv python> experiments/direction_probe.py [--batches 12] [--prompts 16] [--per-prompt 8] [--steps ...]

At the base model it sums the policy gradient (group_mean advantages, soft alignment reward, every step of the
training window) over many independent batches, in two halves whose cosine says how reliable the sum is. Then it
moves the LoRA's up-matrices along that averaged ascent direction, normalised to unit RMS per coordinate, by a
few step sizes, and measures the paired change of the reward on fixed noise: on the training prompts with the
training sampler (η 1: the objective RL climbs) and on the held-out prompts with deterministic DDIM (what the
user sees). A clear gain at some step says a climbable direction exists and the optimizer's noise is what keeps RL
from finding it; no gain at any step says the base model already sits at a local optimum for its text encoder.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from toy_common import REPO, load, pack_module, sampled_batch, trained_columns

log = logging.getLogger("texforce.experiments")


def ascent_direction(trainer, host, advantages, train_prompts: list[str], args) -> tuple[list[torch.Tensor], float]:
    """The reward's ascent direction for the LoRA's up-matrices, summed over args.batches independent batches and
    scaled to unit RMS per coordinate, and the cosine between the sums of the even and the odd batches."""
    ups = list(host.lora.up)
    gen = torch.Generator().manual_seed(11)
    halves = [[torch.zeros_like(u) for u in ups], [torch.zeros_like(u) for u in ups]]
    t0 = time.time()
    for b in range(args.batches):
        prompts, traj = sampled_batch(trainer, train_prompts, gen, args.prompts, args.per_prompt, 5000 + 131 * b)
        traj.advantages = advantages.group_mean_advantages(traj.rewards.float(), prompts)
        columns = (torch.arange(trainer.W).expand(len(prompts), trainer.W) if traj.stochastic is None
                   else torch.cat([trained_columns(trainer, traj, j) for j in range(trainer.cfg.sde_steps)], dim=1))
        with torch.inference_mode(False), host.training(), torch.enable_grad():
            trainer.backward_microbatch(traj, torch.arange(len(prompts)), columns, 1.0 / len(prompts))
        for acc, u in zip(halves[b % 2], ups):
            acc -= u.grad  # the loss gradient's negative: the reward's ascent direction
        for p in trainer.params:
            p.grad = None
        log.info("batch %d: soft %.4f (%.0f s)", b, float(traj.rewards.mean()), time.time() - t0)
    flat = [torch.cat([a.reshape(-1) for a in half]).double() for half in halves]
    cos = float(torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0))
    total = [a + c for a, c in zip(*halves)]
    rms = torch.cat([t.reshape(-1) for t in total]).pow(2).mean().sqrt()
    return [(t / rms).cpu() for t in total], cos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=16, help="training prompts per batch")
    parser.add_argument("--per-prompt", type=int, default=8, help="images per prompt")
    parser.add_argument("--steps", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1],
                        help="displacements along the unit-RMS ascent direction")
    parser.add_argument("--eval-seeds", type=int, default=8, help="noises per held-out prompt")
    parser.add_argument("--random", action="store_true",
                        help="also step along a random direction of the same RMS (the curvature control)")
    parser.add_argument("--direction", default=None, help="reuse a direction saved by an earlier run (skip the sums)")
    parser.add_argument("--tag", default="direction_probe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world, (model, clip, vae), mods = load(args.checkpoint)
    advantages = pack_module("training.advantages")
    evaluation = pack_module("training.evaluation")
    cfg = mods["make_config"]("fast", height=64, width=64)
    host = mods["ComfyHost"](model, clip, vae, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
    train_prompts = [s.prompt for s in world.training_scenes()]
    held = [s.prompt for s in world.held_out_scenes()]
    trainer = mods["Trainer"](host, mods["ToyAlignmentReward"]("soft"), train_prompts, cfg)
    ups = list(host.lora.up)
    out_dir = REPO / "experiments" / "results"
    if args.direction:
        saved = torch.load(args.direction, weights_only=True)
        direction, cos = saved["direction"], saved["halves_cosine"]
    else:
        direction, cos = ascent_direction(trainer, host, advantages, train_prompts, args)
        torch.save({"direction": direction, "halves_cosine": cos}, out_dir / f"{args.tag}_direction.pt")
    log.info("cosine between the halves' gradients %.3f", cos)
    directions = {"ascent": direction}
    if args.random:
        g = torch.Generator().manual_seed(3)
        rnd = [torch.randn(d.shape, generator=g) for d in direction]
        rms = torch.cat([r.reshape(-1) for r in rnd]).pow(2).mean().sqrt()
        directions["random"] = [r / rms for r in rnd]

    train_eval = [p for p in train_prompts for _ in range(2)]
    held_eval = [p for p in held for _ in range(args.eval_seeds)]

    def measure() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(False), torch.no_grad():
            tr = trainer.sample(train_eval, 424242, keep=False).rewards.float()
        return tr, world.alignment(trainer.generate(held_eval, 20261201, lora=True), held_eval)

    base_train, base_held = measure()
    rows = []
    for name, vectors in directions.items():
        for step in args.steps:
            with torch.no_grad():
                for u, d in zip(ups, vectors):
                    u.copy_(d.to(u.device) * step)
            tr, he = measure()
            r_train, r_held = evaluation.paired(base_train, tr), evaluation.paired(base_held, he)
            rows.append({"direction": name, "step": step, "train_eta1": r_train.__dict__,
                         "held_out_ddim": r_held.__dict__})
            log.info("%s step %+.4g: training prompts (η 1) %+.4f ± %.4f (%.1f SE); held-out (DDIM) %+.4f ± %.4f "
                     "(%.1f SE)", name, step, r_train.diff, r_train.se, r_train.z, r_held.diff, r_held.se, r_held.z)
    out = out_dir / f"{args.tag}.json"
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "batches": args.batches,
                               "images_per_batch": args.prompts * args.per_prompt, "halves_cosine": cos,
                               "rows": rows}, indent=1))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
