"""TexForceCompare: did the LoRA make things better? The same prompts on the same noise, with both CLIPs, scored.

ComfyUI's own sampler (KSampler's `comfy.sample.sample`) draws every prompt `images_per_prompt` times with
the CLIP before and after training from identical noise, so the comparison is paired and its standard error
small; the report gives the mean reward before and after, the change in standard errors, and a grid.
"""
from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers
from comfy_api.latest import io

from ..training.evaluation import paired
from ..training.hosts.comfy import comfy_cond, encode_batch
from .compare_grid import compare_grid
from .reward_nodes import Reward
from .train_node import native_resolution


def _encode(clip, prompts: list[str]) -> list:
    """One conditioning for a batch of prompts, each prompt's own row (as the trainer encodes them)."""
    return [comfy_cond(encode_batch(clip, prompts))]


def sample_images(model, clip, vae, prompts: list[str], seed: int, steps: int, cfg: float, sampler: str,
                  scheduler: str, width: int, height: int, batch: int = 32) -> torch.Tensor:
    """Images (B×H×W×3) of `prompts`; batch i's noise comes from seed + i, so two CLIPs get identical noise."""
    images = []
    for i, start in enumerate(range(0, len(prompts), batch)):
        chunk = prompts[start:start + batch]
        fmt = model.model.latent_format  # an empty latent of the model's layout, as EmptyLatentImage makes
        ratio = getattr(fmt, "spacial_downscale_ratio", 8)
        latent = torch.zeros(len(chunk), fmt.latent_channels, height // ratio, width // ratio)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, _encode(clip, chunk),
                                      _encode(clip, [""] * len(chunk)), latent, disable_pbar=True, seed=seed + i)
        images.append(vae.decode(samples).float().cpu())
    return torch.cat(images)[..., :3].clamp(0, 1)


class TexForceCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceCompare",
            display_name="TexForce Compare Before/After",
            category="TexForce/training",
            is_output_node=True,
            description="Samples each prompt several times with the CLIP before and after training, on the same "
                        "noise, scores both with the reward and reports the change with its standard error (a "
                        "paired comparison: a change of 3 standard errors or more is real). Use prompts the LoRA "
                        "was not trained on to see whether what it learned carries over.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip_before", tooltip="The CLIP without the trained LoRA."),
                io.Clip.Input("clip_after", tooltip="The CLIP with it (TexForce Train's CLIP output, or a loader's)."),
                io.Vae.Input("vae"),
                Reward.Input("reward"),
                io.String.Input("prompts", multiline=True, default="a photo of a cat",
                                tooltip="One prompt per line (lines starting with # are skipped)."),
                io.Int.Input("images_per_prompt", default=8, min=1, max=256,
                             tooltip="Noises per prompt; the standard error shrinks with √(prompts × this)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False),
                io.Int.Input("steps", default=20, min=1, max=1000),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform"),
                io.Int.Input("width", default=0, min=0, max=4096, step=8,
                             tooltip="0 = the model family's native size (as TexForce Train)."),
                io.Int.Input("height", default=0, min=0, max=4096, step=8),
                io.Int.Input("grid_columns", default=8, min=1, max=64,
                             tooltip="How many prompts the grid shows (first image of each)."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Mean reward before and after, the change ± its "
                                                                "standard error, and how many standard errors."),
                io.Image.Output(display_name="grid", tooltip="Before (top) and after (bottom), prompt under each."),
                io.Float.Output(display_name="change", tooltip="Mean reward after − before."),
                io.Float.Output(display_name="standard_error"),
                io.Image.Output(display_name="before"),
                io.Image.Output(display_name="after"),
            ],
        )

    @classmethod
    def execute(cls, model, clip_before, clip_after, vae, reward, prompts: str, images_per_prompt: int, seed: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, width: int, height: int,
                grid_columns: int = 8) -> io.NodeOutput:
        lines = [p.strip() for p in prompts.splitlines() if p.strip() and not p.strip().startswith("#")]
        if not lines:
            raise ValueError("prompts is empty: write one prompt per line.")
        if not width or not height:
            size = native_resolution(model)
            width, height = width or size, height or size
        batch = [p for p in lines for _ in range(images_per_prompt)]
        args = (seed, steps, cfg, sampler_name, scheduler, width, height)
        before = sample_images(model, clip_before, vae, batch, *args)
        after = sample_images(model, clip_after, vae, batch, *args)
        score_b = torch.as_tensor(reward(before, batch)).float().flatten()
        score_a = torch.as_tensor(reward(after, batch)).float().flatten()
        result = paired(score_b, score_a)
        name = getattr(reward, "name", type(reward).__name__)
        report = (f"{result.line(name)}\n{len(lines)} prompts × {images_per_prompt} noises, seed {seed}, "
                  f"{steps} steps, cfg {cfg}, {sampler_name}/{scheduler}, {width}×{height}")
        cols = [i * images_per_prompt for i in range(min(grid_columns, len(lines)))]
        grid = compare_grid(before[cols], after[cols], [batch[i] for i in cols], scores=(score_b[cols], score_a[cols]))
        # shown on the node; the numbers also go to the prompt's history for scripts (the demo reads them)
        ui = {"text": [report], "texforce_compare": [{**result.__dict__, "z": result.z, "reward": name,
                                                       "prompts": len(lines), "images_per_prompt": images_per_prompt}]}
        return io.NodeOutput(report, grid, result.diff, result.se, before, after, ui=ui)
