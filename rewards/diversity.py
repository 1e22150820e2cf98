"""A distribution-level diversity reward over the batch (Zhang et al. 2024, large-scale RL for diffusion).

Diversity is a property of a set, not of one image, so the batch is scored together: each image gets its
mean distance to the *other* images of the batch. The batch mean of those scores is the mean pairwise
distance; an image that looks like the rest scores low, one that stands out scores high, so the policy
gradient pushes towards a spread-out distribution. A batch of copies scores exactly 0.

Embeddings: a CLIP image embedding (distance = 1 − cosine, 0..2, semantic diversity), or with no model the
images themselves at 32×32 (distance = RMS pixel difference, 0..1, cheap and weight-free). A batch of one
image has no "others" and is refused.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import RewardInputError
from .preprocess import Images, batch_size, expand_prompts, split_images, to_rgb


class PixelEmbedder(nn.Module):
    """Each image area-resized to 32×32 RGB and flattened (sizes may differ per image)."""

    size = 32

    def forward(self, images: Images) -> torch.Tensor:
        out = []
        for img in split_images(images):
            x = to_rgb(img.float().unsqueeze(0)).permute(0, 3, 1, 2)
            out.append(F.interpolate(x, size=(self.size, self.size), mode="area").flatten(1))
        return torch.cat(out)


class DiversityReward(nn.Module):
    def __init__(self, embedder: nn.Module | None = None):
        super().__init__()
        self.embedder = embedder if embedder is not None else PixelEmbedder()
        self.metric = "pixels" if isinstance(self.embedder, PixelEmbedder) else "cosine"
        self.name = f"diversity_{self.metric}"

    def forward(self, images: Images, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        n = batch_size(images)
        if prompts is not None and not isinstance(prompts, str):
            expand_prompts(prompts, n)
        if n < 2:
            raise RewardInputError("the diversity reward compares the images of a batch with each other: it needs at "
                                   "least 2 images per call (raise batch_size, or leave diversity out)")
        emb = self.embedder(images).float()
        if self.metric == "cosine":  # the embedder returns unit vectors
            dist = (1.0 - emb @ emb.T).clamp_min(0.0)
        else:
            dist = torch.cdist(emb, emb) / emb.shape[1] ** 0.5
        dist = dist * (1.0 - torch.eye(n, device=dist.device, dtype=dist.dtype))  # exact zeros on the diagonal
        return (dist.sum(1) / (n - 1)).float().cpu()
