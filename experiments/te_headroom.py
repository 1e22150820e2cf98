"""How much can the text encoder alone fix? A supervised upper bound for RL on the text encoder.

    <venv python> experiments/te_headroom.py [--prompts held_out|all] [--steps 300]

Fits a text-encoder LoRA with the ordinary denoising loss on correct renders of the chosen prompts (the U-Net
frozen), then measures alignment on the held-out prompts with the LoRA off and on (paired, fixed noise). If even
this supervised fit does not raise held-out alignment, the model's errors are not the text encoder's and no
text-encoder method (RL included) can fix them on this model.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from toy_common import load, paired_eval

log = logging.getLogger("texforce.experiments")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", choices=("held_out", "all", "train"), default="held_out")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-seeds", type=int, default=8)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world, (model, clip, vae), mods = load(args.checkpoint)
    scenes = {"held_out": world.held_out_scenes(), "train": world.training_scenes(),
              "all": world.all_scenes()}[args.prompts]
    cfg = mods["make_config"]("fast", height=64, width=64, seed=0, lora_rank=args.rank)
    host = mods["ComfyHost"](model, clip, vae, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=0)
    trainer = mods["Trainer"](host, mods["ToyAlignmentReward"]("soft"), [s.prompt for s in scenes], cfg)
    g = torch.Generator().manual_seed(1)
    images = world.render([s for s in scenes for _ in range(16)], g)
    prompts = [s.prompt for s in scenes for _ in range(16)]
    with torch.inference_mode(False), torch.no_grad():
        x0_all = host._model.model.process_latent_in(vae.encode(images[..., :3]).float())
    abar = host.alphas_cumprod
    opt = torch.optim.AdamW(host.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    t0 = time.time()
    with host.training():
        for step in range(args.steps):
            pick = torch.randint(0, len(prompts), (args.batch,), generator=g)
            x0 = x0_all[pick]
            t = torch.randint(0, len(abar), (args.batch,), generator=g)
            a = abar[t].view(-1, 1, 1, 1)
            eps = torch.randn(x0.shape, generator=g)
            x = a.sqrt() * x0 + (1 - a).sqrt() * eps
            cond = host.encode([prompts[i] for i in pick])
            with host.predictor(cond, cond, 1.0) as predict:
                loss = torch.nn.functional.mse_loss(predict(x, t), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == args.steps - 1:
                log.info("step %d: loss %.4f (%.0f s)", step, loss.item(), time.time() - t0)
    held = paired_eval(trainer, world, [s.prompt for s in world.held_out_scenes()], args.eval_seeds)
    train = paired_eval(trainer, world, [s.prompt for s in world.training_scenes()][::3], 4)
    log.info("fit on %s: held-out %s; all-correct %.3f → %.3f", args.prompts, held["line"], held["acc_before"],
             held["acc_after"])
    log.info("training prompts %s; all-correct %.3f → %.3f", train["line"], train["acc_before"], train["acc_after"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
