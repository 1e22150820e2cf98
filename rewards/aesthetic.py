"""LAION aesthetic predictor (improved-aesthetic-predictor, as DDPO uses it): about 1–10 per image.

CLIP ViT-L/14's projected image embedding, L2-normalised, goes through the published MLP head
(768-1024-128-64-16-1; dropout between the first layers, identity at inference). The head file is a plain
state dict with keys `layers.{0,2,4,6,7}.{weight,bias}`: the indices are the positions in the reference
nn.Sequential, so the module below keeps the same positions and the file loads with strict key matching.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .clip_models import ClipImageEncoder
from .preprocess import Images, batch_size, expand_prompts
from .weights import AESTHETIC_HEAD, CLIP_L14, BadWeightsError, load_pickle_state_dict

log = logging.getLogger("texforce.rewards")


class AestheticHead(nn.Module):
    """The reference MLP, layer for layer (so `layers.N` keys match the published file)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """The published `sac+logos+ava1-l14-linearMSE.pth` (torch.load with weights_only=True, strict keys)."""
    state = load_pickle_state_dict(Path(path), AESTHETIC_HEAD)
    w0 = state.get("layers.0.weight")
    if not isinstance(w0, torch.Tensor) or w0.ndim != 2:
        raise BadWeightsError(f"{path} is not an aesthetic predictor head: no 'layers.0.weight' matrix "
                              f"(keys: {sorted(state)[:8]}). Expected {AESTHETIC_HEAD.describe()}")
    head = AestheticHead(int(w0.shape[1]))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BadWeightsError(f"{path} does not match the aesthetic head layout "
                              f"(layers.{{0,2,4,6,7}}.{{weight,bias}}): {str(e)[:400]}") from None
    return head.float().eval().requires_grad_(False)


class AestheticReward(nn.Module):
    """Aesthetic score of each image (prompts are ignored)."""

    name = "aesthetic"

    def __init__(self, encoder: ClipImageEncoder, head: AestheticHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    @classmethod
    def from_files(cls, clip_folder: str | Path, head_file: str | Path) -> "AestheticReward":
        head = load_aesthetic_head(head_file)
        encoder = ClipImageEncoder.from_folder(clip_folder, CLIP_L14)
        dim = int(encoder.vision.config.projection_dim)
        if dim != head.input_size:
            raise BadWeightsError(f"the CLIP in {clip_folder} gives {dim}-dim embeddings but the head {head_file} "
                                  f"expects {head.input_size} (the published head needs CLIP ViT-L/14)")
        log.info("aesthetic: CLIP %s + head %s", clip_folder, head_file)
        return cls(encoder, head)

    def forward(self, images: Images, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        if prompts is not None and not isinstance(prompts, str):
            expand_prompts(prompts, batch_size(images))  # a wrong count is still a caller bug
        emb = self.encoder(images)
        return self.head(emb.to(next(self.head.parameters()).dtype)).squeeze(-1).float().cpu()
