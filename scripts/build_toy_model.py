"""Pretrain the embedded toy checkpoint (toy/texforce_toy.safetensors) on the toy world, on the CPU.

    <venv python> scripts/build_toy_model.py [--out toy/texforce_toy.safetensors] [--threads 2]

The defaults make the shipped file (about 30 min on 2 CPU cores). Stages, all seeded:
1. the VAE (ComfyUI's AutoencoderKL, 8× downscale) learns to reconstruct rendered 64×64 scenes; its latent
   is then rescaled so that SD 1.x's latent factor 0.18215 gives the U-Net unit-variance latents;
2. the CLIP text encoder (the real SD 1.x tokenizer) learns first on its own objective (the four attributes read
   back from its pooled output, as CLIP's objective shapes its pooled output) and is then frozen while the U-Net
   learns, as Stable Diffusion's CLIP is: ε-prediction on SD's 1000-step schedule, the prompt dropped 10% of the
   time (classifier-free guidance), on all 96 prompts of the world (the RL held-out split only concerns RL
   training prompts); the saved U-Net is the average of its weights over training (EMA);
3. the result is sampled with ComfyUI's own sampler (DDIM, 20 steps, cfg 5) and read back by the world's
   scorer, which is printed and stored in the file's metadata.

`--text-pretrain 0` trains CLIP and U-Net jointly instead: such a toy never learns the position words (they
collapse in the conditioning while the U-Net ignores them), so its text encoder has nothing left to improve
(README, "What training does to a pretrained model").
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inprocess import pack_module, setup  # noqa: E402

log = logging.getLogger("texforce.build_toy")


def init_fan_in(module: torch.nn.Module, seed: int) -> None:
    """comfy ops leave parameters uninitialised: weights N(0, 1/fan_in), biases 0, norms 1, embeddings N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight") and ("norm" in name or "ln" in name):
                p.fill_(1.0)
            elif name.endswith("logit_scale"):
                p.fill_(math.log(1 / 0.07))
            else:
                p.zero_()


def render_dataset(world, per_scene: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    scenes = world.all_scenes()
    index = [i for i in range(len(scenes)) for _ in range(per_scene)]
    images = world.render([scenes[i] for i in index], torch.Generator().manual_seed(seed))
    return images, index


def captions(world, phrasings: int) -> tuple[list[str], list[int]]:
    """Every scene's canonical prompt (world.Scene.prompt, what RL and the scorer use) followed by up to
    `phrasings` − 1 of its other phrasings (world.Scene.phrasings), and the scene index of each caption.

    A U-Net trained on 96 fixed sentences has seen 97 conditioning vectors and nothing between them. Captions in
    many phrasings, like the web captions SD learned from, make its response to the conditioning smoother around
    each prompt (half the image change under the same random LoRA step). That alone did not make RL on the text
    encoder learn (README, "Why a step hurts"), so the shipped toy is built with one phrasing.
    """
    out, index = [], []
    for i, sc in enumerate(world.all_scenes()):
        variants = sc.phrasings()[:phrasings]
        out += variants
        index += [i] * len(variants)
    return out, index


def train_vae(cm, images: torch.Tensor, steps: int, seed: int, batch: int = 16) -> torch.nn.Module:
    """Reconstruction with the object's pixels weighted 5× (most of an image is background), and noise on the
    latent so the decoder tolerates the imprecise latents a diffusion model produces."""
    ae = cm.new_autoencoder(cm.CONFIG["vae"])
    init_fan_in(ae, seed)
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    x_all = images.permute(0, 3, 1, 2) * 2 - 1
    t0 = time.time()
    for step in range(steps):
        x = x_all[torch.randint(0, len(x_all), (batch,), generator=g)]
        z = ae.encode(x)
        rec = ae.decode(z + 0.1 * z.detach().std() * torch.randn(z.shape, generator=g))
        weight = 1 + 4 * ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.3).float()
        loss = (weight * (rec - x) ** 2).mean() + 1e-4 * z.pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("vae %d/%d: weighted mse %.5f (%.0f s)", step, steps, loss.item(), time.time() - t0)
    return ae


def rescale_latent(ae: torch.nn.Module, latents_std: float, latent_factor: float) -> float:
    """Scale the encoder's mean output by k and the decoder's input by 1/k (exact), so that
    latents × latent_factor have unit standard deviation, as SD's VAE gives its U-Net."""
    k = 1.0 / (latent_factor * latents_std)
    c = ae.quant_conv.weight.shape[0] // 2
    with torch.no_grad():
        ae.quant_conv.weight[:c] *= k
        ae.quant_conv.bias[:c] *= k
        ae.quant_conv.bias[c:] += 2 * math.log(k)  # log-variance of the (unused) posterior follows
        ae.post_quant_conv.weight /= k
    return k


def pretrain_text_encoder(world, encoder: torch.nn.Module, tokens: torch.Tensor, scene_of: list[int], steps: int,
                          seed: int) -> None:
    """The text encoder's own objective: linear heads on its pooled output name each attribute's value.

    Like CLIP's contrastive objective it only shapes the pooled vector; the per-token states the U-Net reads are
    a by-product, which is what leaves the text encoder room to improve for the U-Net (TexForce's premise).
    """
    scenes = world.all_scenes()
    values = [world.COLOURS, world.SHAPES, world.POSITIONS, world.BACKGROUNDS]
    labels = torch.tensor([[list(v).index(x) for v, x in zip(values, scenes[i].values())] for i in scene_of])
    g = torch.Generator().manual_seed(seed)
    width = encoder(tokens[:1].tolist())[1].shape[-1]
    heads = torch.nn.ModuleList(torch.nn.Linear(width, len(v)) for v in values)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(heads.parameters()), lr=1e-3)
    for step in range(steps):
        pick = torch.randint(0, len(labels), (32,), generator=g)
        pooled = encoder(tokens[pick].tolist())[1]
        loss = sum(torch.nn.functional.cross_entropy(h(pooled), labels[pick, i]) for i, h in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                pooled = encoder(tokens.tolist())[1]
                acc = torch.stack([h(pooled).argmax(1) == labels[:, i] for i, h in enumerate(heads)], 1).float().mean(0)
            log.info("text encoder %d/%d: loss %.4f, attributes read from the pooled output %s", step, steps,
                     loss.item(), [round(float(a), 3) for a in acc])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where to write the checkpoint (default: the pack's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-scene", type=int, default=64, help="rendered images per prompt")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--vae-cache", type=Path, default=None,
                        help="keep the stage-1 VAE here and reuse it when the file exists")
    parser.add_argument("--batch", type=int, default=32, help="U-Net training batch")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="peak learning rate of the U-Net (and of the text encoder when they learn jointly)")
    parser.add_argument("--ema", type=float, default=0.999,
                        help="keep an exponential moving average of the weights with this decay and save it "
                             "(0: save the last weights); short runs sample much better from the average")
    parser.add_argument("--caption-swap", type=float, default=0.0,
                        help="share of training captions with one attribute word swapped for another value: a "
                             "model whose errors are the text pathway's (words bound loosely to attributes)")
    parser.add_argument("--text-pretrain", type=int, default=300, metavar="STEPS",
                        help="train the text encoder first on its own objective (read the four attributes back "
                             "from its pooled output, as CLIP is trained on its pooled output), then freeze it while "
                             "the U-Net learns, as Stable Diffusion's CLIP is (0: CLIP and U-Net learn jointly)")
    parser.add_argument("--phrasings", type=int, default=1,
                        help="captions per scene the U-Net (and the text encoder's pretraining) learn from: the "
                             "canonical prompt and other phrasings of it (1: the canonical prompt only)")
    parser.add_argument("--cond-noise", type=float, default=0.0,
                        help="Gaussian noise added to the conditioning while the U-Net learns, relative to its RMS: "
                             "the U-Net learns a neighbourhood of each caption's conditioning, not one point")
    parser.add_argument("--eval-seeds", type=int, default=4, help="noises per prompt for the final check (0: skip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup(cpu=True)
    import types

    import comfy.clip_model
    import comfy.sample
    import comfy.samplers
    from safetensors.torch import save_file

    world = pack_module("toy.world")
    cm = pack_module("toy.comfy_model")
    out_of_place = pack_module("training.hosts.comfy")._clip_layer_forward_out_of_place
    out = args.out or cm.WEIGHTS
    t_start = time.time()
    torch.manual_seed(args.seed)

    # 1. data and VAE
    images, index = render_dataset(world, args.per_scene, args.seed)
    log.info("rendered %d images (%.0f s)", len(images), time.time() - t_start)
    if args.vae_cache and args.vae_cache.is_file():  # stage 1 done before: the same VAE, trained once
        ae = cm.new_autoencoder(cm.CONFIG["vae"])
        ae.load_state_dict(torch.load(args.vae_cache, weights_only=True))
        log.info("VAE from %s", args.vae_cache)
    else:
        ae = train_vae(cm, images, args.vae_steps, args.seed)
        if args.vae_cache:
            torch.save(ae.state_dict(), args.vae_cache)
    ae.eval()
    with torch.no_grad():
        z = torch.cat([ae.encode(x.permute(0, 3, 1, 2) * 2 - 1) for x in images.split(256)])
    unet = cm.new_unet(cm.CONFIG["unet"])
    factor = unet.latent_format.scale_factor
    k = rescale_latent(ae, float(z.std()), factor)
    latents = z * k * factor  # what the U-Net sees (process_in of SD 1.x's latent format)
    log.info("latent std %.3f → ×%.3f; U-Net latents std %.3f mean %.3f", float(z.std()), k, float(latents.std()),
             float(latents.mean()))

    # 2. CLIP + U-Net, jointly
    clip = cm.new_clip(cm.CONFIG["clip"])
    init_fan_in(clip.cond_stage_model, args.seed + 1)
    init_fan_in(unet.diffusion_model, args.seed + 2)
    encoder = clip.cond_stage_model.clip_l
    encoder.requires_grad_(True)  # comfy's CLIP freezes its parameters
    for layer in encoder.modules():
        if isinstance(layer, comfy.clip_model.CLIPLayer):
            layer.forward = types.MethodType(out_of_place, layer)
    prompts, scene_of = captions(world, args.phrasings)
    token_ids = [[t for t, _ in clip.tokenize(p)["l"][0]] for p in prompts + [""]]
    first_caption = torch.tensor([scene_of.index(i) for i in range(len(world.all_scenes()))])
    per_scene = torch.bincount(torch.tensor(scene_of))
    # for --caption-swap: each prompt's neighbours, the prompts that differ from it in exactly one attribute
    scenes = world.all_scenes()
    neighbours = torch.tensor([[j for j, o in enumerate(scenes) if sum(a != b for a, b in zip(s.values(), o.values())) == 1]
                               for s in scenes])
    tokens = torch.tensor(token_ids)
    if args.text_pretrain:  # SD's way: the text encoder learns elsewhere first, then stays frozen
        pretrain_text_encoder(world, encoder, tokens[:-1], scene_of, args.text_pretrain, args.seed + 4)
        encoder.requires_grad_(False)
    params = list(unet.diffusion_model.parameters()) + ([] if args.text_pretrain else list(encoder.parameters()))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    averaged = [p.detach().clone() for p in params] if args.ema else None
    sigmas = unet.model_sampling.sigmas.float()
    g = torch.Generator().manual_seed(args.seed + 3)
    index_t = torch.tensor(index)
    t0 = time.time()
    ema = None
    for step in range(args.unet_steps):
        pick = torch.randint(0, len(latents), (args.batch,), generator=g)
        x0 = latents[pick]
        which = index_t[pick].clone()
        if args.caption_swap > 0:  # loose captions: one attribute word names another value than the image shows
            swap = torch.rand(len(pick), generator=g) < args.caption_swap
            which[swap] = neighbours[which[swap], torch.randint(0, neighbours.shape[1], (int(swap.sum()),),
                                                                  generator=g)]
        # one of the scene's phrasings (after any caption swap), or 10% of the time the empty prompt
        caption = first_caption[which]
        if args.phrasings > 1:
            caption = caption + (torch.rand(len(pick), generator=g) * per_scene[which]).long()
        caption[torch.rand(len(pick), generator=g) < 0.1] = len(prompts)
        with torch.set_grad_enabled(not args.text_pretrain):
            cond = encoder(tokens[caption].tolist())[0]
        if args.cond_noise > 0:
            rms = cond.detach().pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
            cond = cond + args.cond_noise * rms * torch.randn(cond.shape, generator=g)
        t = torch.randint(0, len(sigmas), (len(pick),), generator=g)
        sigma = sigmas[t]
        eps = torch.randn(x0.shape, generator=g)
        x = x0 + sigma.view(-1, 1, 1, 1) * eps
        denoised = unet.apply_model(x, sigma, c_crossattn=cond)
        eps_hat = (x - denoised) / sigma.view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(eps_hat, eps)
        lr = args.lr * min(1.0, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if averaged is not None:
            decay = min(args.ema, (1 + step) / (10 + step))  # warm-up: early weights are not averaged in for long
            with torch.no_grad():
                torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - decay)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 200 == 0 or step == args.unet_steps - 1:
            log.info("unet %d/%d: loss %.4f (ema %.4f, lr %.2g, %.0f s)", step, args.unet_steps, loss.item(), ema, lr,
                     time.time() - t0)
    for layer in encoder.modules():
        layer.__dict__.pop("forward", None)
    if averaged is not None:
        with torch.no_grad():
            for p, a in zip(params, averaged):
                p.copy_(a)

    # 3. evaluate with ComfyUI's own sampler, save
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in cm.checkpoint_state(unet, clip, ae).items()}
    meta = {"texforce.toy_config": json.dumps(cm.CONFIG), "texforce.toy_seed": str(args.seed),
            "texforce.toy_steps": json.dumps({"vae": args.vae_steps, "unet": args.unet_steps,
                                              "per_scene": args.per_scene, "lr": args.lr,
                                              "ema": args.ema, "caption_swap": args.caption_swap,
                                              "text_pretrain": args.text_pretrain,
                                              "phrasings": args.phrasings, "cond_noise": args.cond_noise}),
            "modelspec.title": "TexForce toy text-to-image model (64×64, SD 1.x architecture)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    acc = {}
    if args.eval_seeds:
        model, clip2, vae = cm.load_toy(out)
        acc = evaluate(world, model, clip2, vae, seeds=args.eval_seeds)
        meta["texforce.toy_base_accuracy"] = json.dumps(acc)
        save_file(state, str(out), metadata=meta)
    log.info("wrote %s (%.1f MB) in %.0f s; base model: %s", out, out.stat().st_size / 1e6, time.time() - t_start,
             json.dumps(acc))
    return 0


def evaluate(world, model, clip, vae, seeds: int = 4, steps: int = 20, cfg: float = 5.0) -> dict:
    """Sample every prompt `seeds` times with ComfyUI's DDIM sampler and read the images back."""
    import comfy.sample

    result = {}
    for split, scenes in (("train", world.training_scenes()), ("held_out", world.held_out_scenes())):
        prompts = [s.prompt for s in scenes for _ in range(seeds)]
        neg = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        images = []
        for i, p in enumerate(prompts):
            c, pooled = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
            latent = torch.zeros(1, 4, 8, 8)
            noise = comfy.sample.prepare_noise(latent, 1000 + i)
            samples = comfy.sample.sample(model, noise, steps, cfg, "ddim", "ddim_uniform",
                                          [[c, {"pooled_output": pooled}]], [[neg[0], {"pooled_output": neg[1]}]],
                                          latent, disable_pbar=True, seed=1000 + i)
            images.append(vae.decode(samples))
        images = torch.cat(images).float()
        correct = world.read_back(images).correct([world.parse_prompt(p) for p in prompts])
        result[split] = {"all_correct": round(float(correct.all(1).float().mean()), 4),
                         **{a: round(float(v), 4) for a, v in zip(world.ATTRIBUTES, correct.float().mean(0))},
                         "reward": round(float(world.alignment(images, prompts).mean()), 4)}
    return result


if __name__ == "__main__":
    sys.exit(main())
