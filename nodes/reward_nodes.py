"""Reward nodes: each outputs a TEXFORCE_REWARD that TexForceTrain (and scoring nodes) can use.

Reward models live in `models/reward_models/` (registered with folder_paths at import, so
extra_model_paths.yaml entries named `reward_models` work too). Hugging Face models are folders (listed by
their name with a trailing "/"), single-file weights are listed as files. Loaded models are cached by
path and modification time and handed to ComfyUI's memory manager (a ModelPatcher per reward), so they go
to ComfyUI's device for scoring and are offloaded when ComfyUI needs the memory.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from comfy_api.latest import io, ui

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from ..rewards import registry
from ..rewards import weights as published
from ..rewards.jpeg import JpegReward
from ..rewards.mix import RewardMix
from ..training import reward as reward_api

log = logging.getLogger("texforce.rewards")

Reward = io.Custom("TEXFORCE_REWARD")

FOLDER = "reward_models"
EXTENSIONS = {".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json"}
AUTO = "(auto: published name)"
CACHE_SIZE = 4


def register_folder() -> None:
    """models/reward_models as a model folder; keeps paths that extra_model_paths.yaml already added."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)


register_folder()


def list_entries() -> list[str]:
    """Files and Hugging Face folders (a folder with config.json, shown as 'name/') in reward_models."""
    files = folder_paths.get_filename_list(FOLDER)
    hf_dirs = sorted({os.path.dirname(f).replace("\\", "/") + "/" for f in files
                      if os.path.basename(f) == "config.json" and os.path.dirname(f)})
    singles = [f.replace("\\", "/") for f in files if not f.endswith(".json")
               and not any(f.replace("\\", "/").startswith(d) for d in hf_dirs)]
    return hf_dirs + singles


def find_entry(entry: str, slot: registry.Slot, wanted: published.Published) -> Path:
    """An entry of list_entries (a file, or a folder as 'name/') → its full path; missing → an error naming
    `wanted`, the folders looked in and where it is published."""
    name = entry + "/" if slot.folder_only and not entry.endswith("/") else entry
    if name.endswith("/"):
        found = folder_paths.get_full_path(FOLDER, name + slot.marker)
        if found is None:
            detail = "" if slot.marker == "config.json" else f"The folder needs at least {slot.marker}."
            raise published.MissingWeightsError(wanted, _looked_in(name), detail)
        return Path(found).parent
    found = folder_paths.get_full_path(FOLDER, name)
    if found is None:
        raise published.MissingWeightsError(wanted, _looked_in(name))
    return Path(found)


def _looked_in(name: str) -> str:
    return ", ".join(os.path.join(p, name) for p in folder_paths.get_folder_paths(FOLDER))


class ManagedReward:
    """A reward whose torch modules ComfyUI's model management loads to its device before each call."""

    def __init__(self, reward: torch.nn.Module):
        self.reward, self.name = reward, reward.name
        self.patcher = comfy.model_patcher.ModelPatcher(reward, load_device=mm.get_torch_device(),
                                                        offload_device=mm.unet_offload_device())

    def __call__(self, images, prompts=None) -> torch.Tensor:
        mm.load_models_gpu([self.patcher])
        return self.reward(images, prompts)


_cache: "OrderedDict[tuple, ManagedReward]" = OrderedDict()


def cached(key_parts: tuple, paths: list[Path], build: Callable[[], torch.nn.Module]) -> ManagedReward:
    """Load once per (what, path, mtime); the oldest of more than CACHE_SIZE models is dropped."""
    key = key_parts + tuple((str(p), _mtime(p)) for p in paths)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    reward = ManagedReward(build())
    _cache[key] = reward
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)  # ComfyUI holds loaded models weakly: dropping ours frees it
    return reward


def _mtime(path: Path) -> float:
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.iterdir() if f.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


# the kinds the Reward Model Loader offers, by the labels its combo shows (and saved workflows hold)
KINDS = {registry.KINDS[k].label: k for k in
         ("aesthetic", "pickscore", "hps", "clipscore", "imagereward", "face", "hand")}


def load_reward(kind: str, model: str | None = AUTO, clip_model: str | None = AUTO) -> reward_api.Reward:
    """A reward from the registry, its weights found in reward_models: `model` fills the kind's first weight
    slot, `clip_model` the second; AUTO (or nothing) takes the published names, preferred first. A reward with
    model files is cached and managed by ComfyUI; one without (diversity on pixels) is returned as it is."""
    entry = registry.reward_kind(kind)
    picked = [None if e in (AUTO, "", None) else e for e in (model, clip_model)]
    paths = registry.locate(entry, dict(zip((s.key for s in entry.slots), picked)), find_entry)
    if not paths:
        return entry.build(paths, {})
    return cached((entry.name,), registry.watched_files(entry, paths), lambda: entry.build(paths, {}))


class TexForceJPEGReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceJPEGReward",
            display_name="TexForce JPEG Reward",
            category="TexForce/rewards",
            description="DDPO's JPEG reward: the file size of each image saved as JPEG (quality 95). "
                        "Needs no model weights, so training works out of the box.",
            inputs=[
                io.Combo.Input("mode", options=["compressibility", "incompressibility"], default="compressibility",
                               tooltip="compressibility rewards smaller files (simpler, smoother images); "
                                       "incompressibility rewards larger files (more detail and texture)."),
                io.Int.Input("quality", default=95, min=1, max=100,
                             tooltip="JPEG quality used to measure the size (DDPO uses 95)."),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip="Score: −kB (compressibility) or +kB.")],
        )

    @classmethod
    def execute(cls, mode: str, quality: int = 95) -> io.NodeOutput:
        return io.NodeOutput(JpegReward(mode, quality))


class TexForceRewardModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        entries = [AUTO] + list_entries()
        return io.Schema(
            node_id="TexForceRewardModelLoader",
            display_name="TexForce Reward Model Loader",
            category="TexForce/rewards",
            description="A learned reward from models/reward_models/: LAION aesthetic (~1–10), PickScore (~18–23), "
                        "HPS v2/v2.1 (~0.2–0.35), CLIPScore (100·max(cos,0)), ImageReward (~−2..2), or the face / "
                        "hand rewards of TexForce's applications (best detection confidence in the image, 0..1). "
                        "Loaded once and cached; runs on ComfyUI's device.",
            inputs=[
                io.Combo.Input("kind", options=list(KINDS), default=list(KINDS)[0],
                               tooltip="Which reward model. The published file names (used by 'auto'): aesthetic: "
                                       "sac+logos+ava1-l14-linearMSE.pth + clip-vit-large-patch14/; PickScore: "
                                       "PickScore_v1/; HPS: HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt); "
                                       "CLIPScore: clip-vit-large-patch14/ (any CLIP folder); ImageReward: "
                                       "ImageReward.pt (+ its med_config.json beside it) and bert-base-uncased/; "
                                       "face: yunet_final.pth (kornia's YuNet); hand: owlv2-base-patch16-ensemble/ "
                                       "(or owlvit-base-patch32/)."),
                io.Combo.Input("model", options=entries, default=AUTO,
                               tooltip="The weights: a file, or a Hugging Face folder (name ending in '/'). "
                                       "For aesthetic this is the MLP head file."),
                io.Combo.Input("clip_model", options=entries, default=AUTO, optional=True,
                               tooltip="The second folder some rewards need. aesthetic: the CLIP ViT-L/14 Hugging "
                                       "Face folder (openai/clip-vit-large-patch14). ImageReward: the BERT tokenizer "
                                       "folder (bert-base-uncased/, vocab.txt is enough). Others: unused."),
            ],
            outputs=[Reward.Output(display_name="reward")],
        )

    @classmethod
    def execute(cls, kind: str, model: str, clip_model: str = AUTO) -> io.NodeOutput:
        return io.NodeOutput(load_reward(kind, model, clip_model))


class TexForceDiversityReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceDiversityReward",
            display_name="TexForce Diversity Reward",
            category="TexForce/rewards",
            description="Distribution-level diversity over each scored batch: every image gets its mean distance to "
                        "the other images of the batch (copies score 0). Needs at least 2 images per batch; use it "
                        "inside a Reward Mix so quality rewards keep the images good.",
            inputs=[io.Combo.Input("embedding", options=["pixels (no model)"] + list_entries(),
                                   default="pixels (no model)",
                                   tooltip="pixels: RMS difference of 32×32 thumbnails (0..1, cheap). A CLIP "
                                           "folder: 1 − cosine of CLIP image embeddings (semantic diversity).")],
            outputs=[Reward.Output(display_name="reward")],
        )

    @classmethod
    def execute(cls, embedding: str) -> io.NodeOutput:
        return io.NodeOutput(load_reward("diversity", None if embedding.startswith("pixels") else embedding))


MIX_SLOTS = 4


class TexForceRewardMix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = []
        for i in range(1, MIX_SLOTS + 1):
            inputs.append(Reward.Input(f"reward_{i}", optional=i > 1, tooltip=f"Reward {i}."))
            inputs.append(io.Float.Input(f"weight_{i}", default=1.0, min=-100.0, max=100.0, step=0.05,
                                         tooltip=f"Weight of reward {i} (negative to penalise it)."))
        inputs.append(io.Boolean.Input("normalize", default=True,
                                       tooltip="Standardise each reward with its running mean and std before "
                                               "weighting, so weights compare rewards of different scales. Off: "
                                               "plain weighted sum of the raw scores."))
        return io.Schema(
            node_id="TexForceRewardMix",
            display_name="TexForce Reward Mix",
            category="TexForce/rewards",
            description="Several rewards as one: Σ weight_i · (r_i − running mean_i) / running std_i "
                        "(or Σ weight_i · r_i with normalize off). Unconnected slots are ignored.",
            inputs=inputs,
            outputs=[Reward.Output(display_name="reward")],
        )

    @classmethod
    def execute(cls, reward_1, weight_1: float = 1.0, normalize: bool = True, **kw) -> io.NodeOutput:
        rewards, weights = [reward_1], [weight_1]
        for i in range(2, MIX_SLOTS + 1):
            if kw.get(f"reward_{i}") is not None:
                rewards.append(kw[f"reward_{i}"])
                weights.append(float(kw.get(f"weight_{i}", 1.0)))
        return io.NodeOutput(RewardMix(rewards, weights, normalize=normalize))


def split_prompt_lines(prompt: str, n: int) -> list[str]:
    """One prompt for all images, or one non-empty line per image."""
    lines = [line.strip() for line in (prompt or "").splitlines() if line.strip()]
    if len(lines) <= 1:
        return [lines[0] if lines else ""] * n
    if len(lines) != n:
        raise ValueError(f"{n} images but {len(lines)} prompt lines: give one prompt for all images, or exactly one "
                         "line per image")
    return lines


def score_table(scores: list[float], prompts: list[str], order: list[int], name: str,
                components: dict[str, torch.Tensor] | None = None) -> str:
    comp = components or {}
    head = ["rank", "image", name] + list(comp) + ["prompt"]
    rows = ["\t".join(head)]
    for rank, i in enumerate(order, 1):
        cells = [str(rank), str(i), f"{scores[i]:.4g}"] + [f"{float(v[i]):.4g}" for v in comp.values()]
        rows.append("\t".join(cells + [prompts[i][:80]]))
    return "\n".join(rows)


class TexForceScoreImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceScoreImages",
            display_name="TexForce Score Images",
            category="TexForce/rewards",
            description="Score every image with a reward; outputs the scores, their mean, a table, and the batch "
                        "sorted best-first (top_k > 0 keeps only the best k): best-of-N in one node.",
            inputs=[
                io.Image.Input("images"),
                Reward.Input("reward"),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="One prompt for all images, or one line per image (text–image rewards "
                                        "such as PickScore, HPS and CLIPScore compare each image with its prompt)."),
                io.Int.Input("top_k", default=0, min=0, max=4096,
                             tooltip="Keep only the k best images in the sorted output (0: all)."),
            ],
            outputs=[
                io.Float.Output(display_name="scores", is_output_list=True,
                                tooltip="One score per image, in input order."),
                io.Float.Output(display_name="mean"),
                io.String.Output(display_name="table", tooltip="rank, image index, score (and mix components), "
                                                               "prompt; best first."),
                io.Image.Output(display_name="sorted_images", tooltip="Best first; top_k of them if set."),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, reward, prompt: str = "", top_k: int = 0) -> io.NodeOutput:
        n = int(images.shape[0])
        prompts = split_prompt_lines(prompt, n)
        scores_t = torch.as_tensor(reward(images, prompts)).detach().float().cpu().reshape(-1)
        if scores_t.numel() != n:
            raise ValueError(f"the reward returned {scores_t.numel()} scores for {n} images")
        scores = [float(s) for s in scores_t]
        key = torch.where(torch.isfinite(scores_t), scores_t, torch.full_like(scores_t, -float("inf")))
        order = torch.argsort(key, descending=True, stable=True).tolist()
        if top_k > 0:
            order = order[:top_k]
        name = str(getattr(reward, "name", type(reward).__name__))
        table = score_table(scores, prompts, order, name, getattr(reward, "last_components", None))
        finite = scores_t[torch.isfinite(scores_t)]
        mean = float(finite.mean()) if finite.numel() else float("nan")
        log.info("scored %d images with %s: mean %.4g", n, name, mean)
        summary = f"{name}: mean {mean:.4g} over {n} images\n{table}"
        return io.NodeOutput(scores, mean, table, images[order], ui=ui.PreviewText(summary))
