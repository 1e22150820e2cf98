"""TexForce's composition claim on the toy: a LoRA trained for one reward fuses with a LoRA trained for another,
keeping most of both gains.

    <venv python> experiments/lora_fusion.py --first A.safetensors --second B.safetensors [--phrasing rephrased]

A and B are text-encoder LoRAs the pack wrote (e.g. texforce_heldout.py --save-lora, A trained on the toy's
alignment, B on JPEG compressibility). The fused LoRA is training/lora/fuse.py's exact sum (ranks stacked), the
same conditioning as loading both at strength 1. On the held-out prompts and fixed noise, each of A, B and A+B is
compared with the base model on both rewards (paired), so "keeps most of both gains" is a ratio of two measured
changes with their standard errors.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from toy_common import EVAL_SEED, REPO, evaluate_pair, grid, load, pack_module

log = logging.getLogger("texforce.experiments")


def generator_for(lora, world, toy, mods, prompts: list[str]):
    """A trainer whose LoRA slot holds `lora` exactly (its rank and alpha), for fixed-noise generation."""
    model, clip, vae = toy
    rank = max(lora.ranks())
    host = mods["ComfyHost"](model, clip, vae, rank=rank, alpha=float(rank), seed=0)
    host.lora.load_lora_set(lora)
    cfg = mods["make_config"]("fast", height=64, width=64, lora_rank=rank, lora_alpha=float(rank))
    return mods["Trainer"](host, mods["ToyAlignmentReward"]("soft"), prompts, cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=Path, required=True, help="LoRA A (e.g. trained on alignment)")
    parser.add_argument("--second", type=Path, required=True, help="LoRA B (e.g. trained on JPEG compressibility)")
    parser.add_argument("--eval-seeds", type=int, default=4, help="noises per held-out prompt")
    parser.add_argument("--phrasing", choices=("prompt", "rephrased"), default="rephrased")
    parser.add_argument("--tag", default="lora_fusion")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world, toy, mods = load()
    read_lora, fuse_loras = pack_module("training.lora.read").read_lora, pack_module("training.lora.fuse").fuse_loras
    first, second = read_lora(args.first), read_lora(args.second)
    held = (world.rephrased(world.held_out_scenes()) if args.phrasing == "rephrased"
            else [s.prompt for s in world.held_out_scenes()])
    batch = [p for p in held for _ in range(args.eval_seeds)]
    variants = {"A": first, "B": second, "A+B": fuse_loras([(first, 1.0), (second, 1.0)])}
    base, results, rows = None, {}, []
    for name, lora in variants.items():
        trainer = generator_for(lora, world, toy, mods, held)
        with torch.inference_mode(False):
            if base is None:
                base = trainer.generate(batch, EVAL_SEED, lora=False)
            images = trainer.generate(batch, EVAL_SEED, lora=True)
        results[name] = evaluate_pair(world, batch, base, images, args.eval_seeds)
        r = results[name]
        log.info("%-4s alignment %+.4f ± %.4f (%.1f SE); JPEG %+.3f ± %.3f kB (%.1f SE); pixel distance %.4f", name,
                 r["diff"], r["se"], r["z"], r["jpeg_kb"]["diff"], r["jpeg_kb"]["se"], r["jpeg_kb"]["z"],
                 r["image_distance"])
        rows.append(images[:: args.eval_seeds][::7])
    kept = {"alignment": results["A+B"]["diff"] / results["A"]["diff"],
            "jpeg_kb": results["A+B"]["jpeg_kb"]["diff"] / results["B"]["jpeg_kb"]["diff"]}
    log.info("A+B keeps %.0f%% of A's alignment gain and %.0f%% of B's JPEG change", 100 * kept["alignment"],
             100 * kept["jpeg_kb"])
    out = REPO / "experiments" / "results" / f"{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"first": str(args.first), "second": str(args.second), "phrasing": args.phrasing,
                               "eval_seeds": args.eval_seeds, "results": results, "kept": kept}, indent=1))
    grid([base[:: args.eval_seeds][::7], *rows], out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
