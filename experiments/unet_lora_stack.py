"""TexForce's stacking claim on the toy: a text-encoder LoRA trained with RL stacks with a U-Net LoRA trained for
something else, each keeping its effect, without retraining either.

    <venv python> experiments/unet_lora_stack.py --te A.safetensors [--steps 400] [--phrasing rephrased]

The U-Net LoRA is a "soft focus" style: peft LoRA layers on the toy U-Net's attention, feed-forward, projection
and residual convolutions, fitted with the ordinary denoising loss on renders of the toy world blurred by a
5×5 box filter (the prompts as conditioning, the text encoder frozen). It is saved in ComfyUI's generic LoRA
layout (`diffusion_model.<module>.lora_up/lora_down/alpha`) and applied through ComfyUI's own
`comfy.sd.load_lora_for_models`, as LoraLoaderModelOnly does. On the held-out prompts and fixed noise, base, TE
LoRA alone, U-Net LoRA alone and both are compared: alignment (what the TE LoRA was trained for) and sharpness
(mean absolute Laplacian, what the style lowers), each as a paired change against the base.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from toy_common import EVAL_SEED, REPO, evaluate_pair, grid, load, pack_module

log = logging.getLogger("texforce.experiments")
TARGETS = r".*(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out|in_layers\.2|out_layers\.3)$"


def soft_focus(images: torch.Tensor) -> torch.Tensor:
    """The style the U-Net LoRA learns: a 5×5 box blur of (B, H, W, C) images (edges replicated)."""
    x = F.pad(images.permute(0, 3, 1, 2), (2, 2, 2, 2), mode="replicate")
    return F.avg_pool2d(x, 5, stride=1).permute(0, 2, 3, 1)


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Per image, the mean absolute 4-neighbour Laplacian of the grey image (0 for a flat image; blur lowers it)."""
    grey = images.float().mean(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernel).abs().mean(dim=(1, 2, 3))


def fit_unet_lora(world, rank: int, steps: int, lr: float, batch: int) -> dict[str, torch.Tensor]:
    """The soft-focus U-Net LoRA as a ComfyUI-layout state dict, fitted on a private copy of the toy model."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    cm = pack_module("toy.comfy_model")
    model, clip, vae = cm.load_toy(cm.WEIGHTS)  # a copy of its own: the peft layers never touch the shared one
    unet = model.model.diffusion_model
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    g = torch.Generator().manual_seed(7)
    scenes = world.training_scenes()
    pool = [s for s in scenes for _ in range(8)]
    encode_batch = pack_module("training.hosts.comfy").encode_batch
    abar = pack_module("training.ddim").abar_from_sigma(model.get_model_object("model_sampling").sigmas.float())
    with torch.inference_mode(False), torch.no_grad():
        images = soft_focus(world.render(pool, g))
        x0_all = model.model.process_latent_in(vae.encode(images[..., :3]).float())
        context = encode_batch(clip, [s.prompt for s in pool])["cross_attn"].float()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.time()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(steps):
            pick = torch.randint(0, len(pool), (batch,), generator=g)
            t = torch.randint(0, len(abar), (batch,), generator=g)
            a = abar[t].view(-1, 1, 1, 1)
            eps = torch.randn(x0_all[pick].shape, generator=g)
            x_t = a.sqrt() * x0_all[pick] + (1 - a).sqrt() * eps
            loss = F.mse_loss(unet(x_t, t.float(), context=context[pick]), eps)  # ε-prediction, as SD1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == steps - 1:
                log.info("U-Net LoRA step %d: loss %.4f (%.0f s)", step, loss.item(), time.time() - t0)
    peft_sd = get_peft_model_state_dict(unet)
    out = {}
    for key, value in peft_sd.items():  # peft's lora_A/lora_B -> ComfyUI's lora_down/lora_up, same module paths
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_down" if kind.startswith("A") else "lora_up"
        out[f"diffusion_model.{module}.{name}.weight"] = value.detach().float().contiguous()
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(rank))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--te", type=Path, required=True, help="the text-encoder LoRA (e.g. texforce_heldout.py --save-lora)")
    parser.add_argument("--unet", type=Path, default=REPO / "experiments" / "results" / "unet_soft_focus.safetensors",
                        help="the U-Net LoRA: read if it exists, else fitted and written here")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--phrasing", choices=("prompt", "rephrased"), default="rephrased")
    parser.add_argument("--tag", default="unet_lora_stack")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world, (model, clip, vae), mods = load()  # puts ComfyUI on the path
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file

    if not args.unet.exists():
        args.unet.parent.mkdir(parents=True, exist_ok=True)
        save_file(fit_unet_lora(world, args.rank, args.steps, args.lr, args.batch), str(args.unet))
    unet_lora = comfy.utils.load_torch_file(str(args.unet), safe_load=True)
    model_u, _ = comfy.sd.load_lora_for_models(model, None, unet_lora, 1.0, 0.0)  # what LoraLoaderModelOnly does
    te = pack_module("training.lora.read").read_lora(args.te)
    held = (world.rephrased(world.held_out_scenes()) if args.phrasing == "rephrased"
            else [s.prompt for s in world.held_out_scenes()])
    batch = [p for p in held for _ in range(args.eval_seeds)]
    rank = max(te.ranks())
    cfg = mods["make_config"]("fast", height=64, width=64, lora_rank=rank, lora_alpha=float(rank))
    images = {}
    for unet_name, m in (("", model), ("U", model_u)):
        host = mods["ComfyHost"](m, clip, vae, rank=rank, alpha=float(rank), seed=0)
        host.lora.load_lora_set(te)
        trainer = mods["Trainer"](host, mods["ToyAlignmentReward"]("soft"), held, cfg)
        with torch.inference_mode(False):
            images[unet_name or "base"] = trainer.generate(batch, EVAL_SEED, lora=False)
            images[("A+" + unet_name) if unet_name else "A"] = trainer.generate(batch, EVAL_SEED, lora=True)
    paired = pack_module("training.evaluation").paired
    base = images["base"]
    results = {}
    for name in ("A", "U", "A+U"):
        r = evaluate_pair(world, batch, base, images[name], args.eval_seeds)
        sharp = paired(sharpness(base), sharpness(images[name]))
        r["sharpness"] = {**sharp.__dict__, "z": sharp.z}
        results[name] = r
        log.info("%-4s alignment %+.4f ± %.4f (%.1f SE); sharpness %.4f → %.4f (%+.4f ± %.4f, %.1f SE); pixel "
                 "distance %.4f", name, r["diff"], r["se"], r["z"], sharp.before, sharp.after, sharp.diff, sharp.se,
                 sharp.z, r["image_distance"])
    kept = {"alignment": results["A+U"]["diff"] / results["A"]["diff"],
            "sharpness": results["A+U"]["sharpness"]["diff"] / results["U"]["sharpness"]["diff"]}
    log.info("A+U keeps %.0f%% of A's alignment gain and %.0f%% of U's sharpness change", 100 * kept["alignment"],
             100 * kept["sharpness"])
    out = REPO / "experiments" / "results" / f"{args.tag}.json"
    out.write_text(json.dumps({"te": str(args.te), "unet": str(args.unet), "phrasing": args.phrasing,
                               "eval_seeds": args.eval_seeds, "results": results, "kept": kept}, indent=1))
    grid([images[k][:: args.eval_seeds][::7] for k in ("base", "A", "U", "A+U")], out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
