"""TexForce's claim on the toy: RL on the text encoder raises alignment on the training prompts AND on prompt
combinations it never trained on.

    <venv python> experiments/texforce_heldout.py [--preset fast] [--seeds 0 1 2] [--set key=value ...]
        [--reward alignment | jpeg | alignment+diversity=W] [--save-lora DIR]

Trains a LoRA on the 72 training prompts of the toy world with the toy alignment reward, then samples the 24
held-out combinations and the training prompts on fixed noise with the LoRA off and on (paired), and prints the
change with its standard error. Writes results JSON and a before/after grid under experiments/results/.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from toy_common import REPO, grid, load, pack_module, paired_eval

log = logging.getLogger("texforce.experiments")


def parse_sets(items: list[str]) -> dict:
    """KEY=VALUE settings; values are JSON where they parse (numbers, true/false), else strings."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def make_reward(spec: str, mods):
    """alignment (the toy's soft alignment), jpeg (compressibility: −kB), or alignment+diversity=W: the alignment
    mixed with the batch's pixel diversity at weight W (rewards/mix.py standardises each)."""
    alignment = mods["ToyAlignmentReward"]("soft")
    if spec == "alignment":
        return alignment
    if spec == "jpeg":
        return pack_module("rewards.jpeg").JpegReward("compressibility")
    if spec.startswith("alignment+diversity="):
        weight = float(spec.partition("=")[2])
        diversity = pack_module("rewards.diversity").DiversityReward()
        return pack_module("rewards.mix").RewardMix([alignment, diversity], [1.0, weight])
    raise SystemExit(f"--reward {spec!r}: expected alignment, jpeg or alignment+diversity=W")


def run(seed: int, preset: str, overrides: dict, eval_seeds: int, world, toy, mods,
        phrasing: str = "prompt", reward: str = "alignment") -> dict:
    model, clip, vae = toy
    cfg = mods["make_config"](preset, **{"height": 64, "width": 64, "seed": seed, **overrides})
    host = mods["ComfyHost"](model, clip, vae, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
    if phrasing == "rephrased":  # the scenes as the toy never saw them written (world.Scene.phrasings)
        train_prompts, held = world.rephrased(world.training_scenes()), world.rephrased(world.held_out_scenes())
    else:
        train_prompts = [s.prompt for s in world.training_scenes()]
        held = [s.prompt for s in world.held_out_scenes()]
    trainer = mods["Trainer"](host, make_reward(reward, mods), train_prompts, cfg)
    t0 = time.time()
    with torch.inference_mode(False):
        trainer.run()
    seconds = time.time() - t0
    held_res = paired_eval(trainer, world, held, eval_seeds)
    train_res = paired_eval(trainer, world, train_prompts[::3], max(1, eval_seeds // 2))
    log.info("seed %d (%.0f s): held-out %s; all-correct %.3f → %.3f", seed, seconds, held_res["line"],
             held_res["acc_before"], held_res["acc_after"])
    log.info("seed %d: training prompts %s", seed, train_res["line"])
    return {"seed": seed, "seconds": seconds, "held_out": held_res, "train": train_res,
            "history": [{k: h[k] for k in ("epoch", "reward_mean", "approx_kl", "clipfrac", "grad_norm")}
                        for h in trainer.history], "trainer": trainer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-seeds", type=int, default=8, help="noises per held-out prompt (24 prompts, or 168 rephrased)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="texforce_heldout")
    parser.add_argument("--checkpoint", default=None, help="another toy checkpoint file (default: the pack's)")
    parser.add_argument("--reward", default="alignment",
                        help="alignment, jpeg (compressibility) or alignment+diversity=W (see make_reward)")
    parser.add_argument("--save-lora", type=Path, default=None,
                        help="save each seed's LoRA to DIR/<tag>_seed<N>.safetensors (kohya, as the node writes)")
    parser.add_argument("--phrasing", choices=("prompt", "rephrased"), default="prompt",
                        help="prompt: the world's prompts, as the toy learned them; rephrased: the same scenes in the "
                             "7 other phrasings of world.Scene.phrasings (504 training, 168 held-out prompts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world, toy, mods = load(args.checkpoint)
    overrides = parse_sets(args.set)
    results = []
    for seed in args.seeds:
        r = run(seed, args.preset, overrides, args.eval_seeds, world, toy, mods, args.phrasing, args.reward)
        trainer = r.pop("trainer")
        if args.save_lora:
            args.save_lora.mkdir(parents=True, exist_ok=True)
            pack_module("training.lora.write").save_kohya(
                trainer.host.lora.to_lora_set(f"{args.tag}_seed{seed}"), args.save_lora / f"{args.tag}_seed{seed}.safetensors",
                family=trainer.host.family)
        results.append(r)
        held = [s.prompt for s in world.held_out_scenes()][::3]
        grid([trainer.generate(held, 7, lora=False), trainer.generate(held, 7, lora=True)],
             REPO / "experiments" / "results" / f"{args.tag}_seed{seed}.png")
    out = REPO / "experiments" / "results" / f"{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "overrides": overrides, "reward": args.reward,
                               "phrasing": args.phrasing, "runs": results}, indent=1))
    for r in results:
        h = r["held_out"]
        log.info("seed %d: held-out Δ %+.4f ± %.4f (%.1f SE), all-correct %.3f → %.3f, pixel distance to the base "
                 "%.4f; training prompts Δ %+.4f ± %.4f; %.0f s", r["seed"], h["diff"], h["se"], h["z"], h["acc_before"],
                 h["acc_after"], h["image_distance"], r["train"]["diff"], r["train"]["se"], r["seconds"])
        log.info("seed %d: held-out JPEG %.3f → %.3f kB (%+.3f ± %.3f), diversity per prompt %.4f → %.4f", r["seed"],
                 h["jpeg_kb"]["before"], h["jpeg_kb"]["after"], h["jpeg_kb"]["diff"], h["jpeg_kb"]["se"],
                 h["diversity_before"], h["diversity_after"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
