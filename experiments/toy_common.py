"""Shared by the experiments: the toy checkpoint in this process, a trainer on it, paired evaluation.

Evaluation is paired: the same prompts on the same fixed noise with the LoRA off (the base model) and on, so
the standard error of the mean difference is small and a change of a few hundredths is measurable.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _inprocess():
    """scripts/inprocess.py, loaded by path (no sys.path change)."""
    if "texforce_inprocess" not in sys.modules:
        spec = importlib.util.spec_from_file_location("texforce_inprocess", REPO / "scripts" / "inprocess.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["texforce_inprocess"]


setup, pack_module = _inprocess().setup, _inprocess().pack_module

log = logging.getLogger("texforce.experiments")
EVAL_SEED = 20261201


def load(checkpoint: str | None = None):
    """(world, toy checkpoint (MODEL, CLIP, VAE), pack modules) with ComfyUI imported in this process."""
    setup()
    world = pack_module("toy.world")
    cm = pack_module("toy.comfy_model")
    return world, cm.load_toy(checkpoint or cm.WEIGHTS), {
        "ComfyHost": pack_module("training.hosts.comfy").ComfyHost, "Trainer": pack_module("training.loop").Trainer,
        "make_config": pack_module("training.config").make_config,
        "ToyAlignmentReward": pack_module("rewards.toy_alignment").ToyAlignmentReward}


def paired_eval(trainer, world, prompts: list[str], seeds: int, seed: int = EVAL_SEED) -> dict:
    """Every prompt × `seeds` noises with the LoRA off (the base model) and on: the soft reward's paired change
    (training/evaluation.py), the strict accuracy before and after, the mean pixel distance between them, the
    JPEG size's paired change (compressibility, the second reward of the fusion experiment) and each prompt's
    diversity (mean pairwise pixel distance of its images) before and after."""
    batch = [p for p in prompts for _ in range(seeds)]
    base = trainer.generate(batch, seed, lora=False)
    tuned = trainer.generate(batch, seed, lora=True)
    return evaluate_pair(world, batch, base, tuned, seeds)


def evaluate_pair(world, batch: list[str], base: torch.Tensor, tuned: torch.Tensor, seeds: int) -> dict:
    """paired_eval's numbers for images already generated (base and tuned on the same noise, `seeds` per prompt)."""
    paired = pack_module("training.evaluation").paired
    jpeg_kilobytes = pack_module("rewards.jpeg").jpeg_kilobytes
    result = paired(world.alignment(base, batch), world.alignment(tuned, batch))
    kb = paired(jpeg_kilobytes(base), jpeg_kilobytes(tuned))
    return {**result.__dict__, "z": result.z, "line": result.line("alignment"),
            "acc_before": float(world.alignment(base, batch, strict=True).mean()),
            "acc_after": float(world.alignment(tuned, batch, strict=True).mean()),
            # how far the LoRA moved the pictures (DPOK's trade-off): mean absolute pixel change, 0..1
            "image_distance": float((tuned - base).abs().mean()),
            "jpeg_kb": {**kb.__dict__, "z": kb.z},
            "diversity_before": prompt_diversity(base, seeds), "diversity_after": prompt_diversity(tuned, seeds)}


def prompt_diversity(images: torch.Tensor, per_prompt: int) -> float:
    """Mean over prompts of the mean pairwise RMS pixel distance between that prompt's images (0..1); images are
    grouped as paired_eval lays them out (each prompt's `per_prompt` noises together)."""
    if per_prompt < 2:
        return float("nan")
    flat = images.float().reshape(-1, per_prompt, images[0].numel())
    dist = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5  # (prompts, n, n)
    return float(dist.sum(dim=(1, 2)).mean() / (per_prompt * (per_prompt - 1)))


def sampled_batch(trainer, prompts: list[str], gen: torch.Generator, n_prompts: int, per_prompt: int, seed: int):
    """`n_prompts` prompts drawn from `prompts` by `gen`, `per_prompt` images each, sampled with the trainer's own
    sampler (no grad, chains kept for the policy gradient): (the batch's prompt list, its Trajectory). With the
    config's sde_steps > 0, branch sampling as in training: each prompt's group shares its start noise and takes
    noise only at its drawn steps (the Trajectory's `stochastic` mask)."""
    chosen = [prompts[i] for i in torch.randperm(len(prompts), generator=gen)[:n_prompts]]
    batch = [p for p in chosen for _ in range(per_prompt)]
    mask, group = None, 1
    if trainer.cfg.sde_steps:
        sampling = pack_module("training.sampling")
        cfg = dataclasses.replace(trainer.cfg, images_per_prompt=per_prompt)
        mask = sampling.step_mask(sampling.branch_steps(cfg, len(batch), trainer.W, gen), trainer.cfg.num_steps)
        group = per_prompt
    with torch.inference_mode(False), torch.no_grad():
        return batch, trainer.sample(batch, seed, stochastic=mask, group=group)


def trained_columns(trainer, traj, step: int) -> torch.Tensor:
    """(B, 1) the step index each image is trained at for window step `step`: `step` itself, or with branch
    sampling its `step`-th stochastic step."""
    if traj.stochastic is None:
        return torch.full((len(traj), 1), step, dtype=torch.long)
    return traj.stochastic.nonzero()[:, 1].reshape(len(traj), -1)[:, step:step + 1]


def grid(images_rows: list[torch.Tensor], path: Path, scale: int = 2) -> Path:
    """Rows of equally many images (B×H×W×3) into one PNG."""
    import numpy as np
    from PIL import Image

    rows = [torch.cat(list(r), dim=1) for r in images_rows]
    arr = (torch.cat(rows, dim=0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
