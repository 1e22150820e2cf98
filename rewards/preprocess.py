"""Image preprocessing for the reward models, written in torch.

The reference pipelines (Hugging Face's CLIPImageProcessor, open_clip's torchvision transform) go through
PIL, which cuts the autograd graph and costs a CPU round trip per image. Here the same steps (resize the
shortest side with antialiased bicubic, centre crop, CLIP mean/std) are torch ops, so a reward can be
backpropagated through when later work needs it, and the numbers stay within PIL's uint8 rounding of the
reference (the tests measure it).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .base import RewardInputError

log = logging.getLogger("texforce.rewards")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class ClipPreprocess:
    """Resize the shortest side to `size` (bicubic, antialiased), centre-crop `crop`×`crop`, normalise.

    `crop_rounding` is where the two reference libraries differ by at most one pixel when the margin is odd:
    Hugging Face floors the top/left offset, torchvision (open_clip) rounds it.
    """

    size: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_rounding: str = "floor"

    @classmethod
    def from_hf_folder(cls, folder: Path) -> "ClipPreprocess":
        """Read size/crop/mean/std from a Hugging Face `preprocessor_config.json` (defaults: OpenAI CLIP's)."""
        path = Path(folder) / "preprocessor_config.json"
        combined = Path(folder) / "processor_config.json"  # transformers >= 5 writes one file for the processor
        if path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
        elif combined.is_file():
            cfg = json.loads(combined.read_text(encoding="utf-8")).get("image_processor", {})
        else:
            log.info("no preprocessor_config.json in %s: using OpenAI CLIP's preprocessing (224, bicubic)", folder)
            return cls()
        size = cfg.get("size", 224)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or size.get("height") or 224
        crop = cfg.get("crop_size", size)
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("width") or size
        return cls(int(size), int(crop), tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD)))

    def __call__(self, images: Images, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """B×H×W×C images in 0..1 (or a list of H×W×C of different sizes) → B×3×crop×crop, normalised."""
        items = split_images(images)
        out = [self._one(img.to(device=device, dtype=dtype)) for img in items] if _mixed_sizes(items) else \
            [self._one_batch(torch.stack([i.to(device=device, dtype=dtype) for i in items]))]
        return torch.cat(out)

    def _one(self, img: torch.Tensor) -> torch.Tensor:
        return self._one_batch(img.unsqueeze(0))

    def _one_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = to_rgb(x).permute(0, 3, 1, 2)  # B,3,H,W
        h, w = x.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = self.size, int(self.size * long / short)  # as HF and torchvision compute it
        nh, nw = (new_short, new_long) if h <= w else (new_long, new_short)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)  # PIL clamps bicubic overshoot to the 8-bit range
        top, left = self._offset(nh, self.crop), self._offset(nw, self.crop)
        if nh < self.crop or nw < self.crop:
            raise RewardInputError(f"crop {self.crop} larger than the resized image {nh}×{nw}")
        x = x[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def _offset(self, length: int, crop: int) -> int:
        margin = (length - crop) / 2.0
        return int(round(margin)) if self.crop_rounding == "round" else int(math.floor(margin))


def split_images(images: Images) -> list[torch.Tensor]:
    """Validate and split a B×H×W×C tensor (or a list of H×W×C tensors) into per-image H×W×C tensors."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise RewardInputError(f"expected images as a B×H×W×C tensor with C = 1, 3 or 4, got {tuple(images.shape)}")
        items = list(images.unbind(0))
    elif isinstance(images, (list, tuple)):
        items = list(images)
        for i, img in enumerate(items):
            if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
                got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise RewardInputError(f"image {i}: expected an H×W×C tensor with C = 1, 3 or 4, got {got}")
    else:
        raise RewardInputError(f"expected images as a B×H×W×C tensor or a list of H×W×C tensors, got "
                               f"{type(images).__name__}")
    if not items:
        raise RewardInputError("the image batch is empty")
    for i, img in enumerate(items):
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise RewardInputError(f"image {i} has no pixels ({tuple(img.shape)})")
        if not torch.isfinite(img).all():
            raise RewardInputError(f"image {i} holds NaN or Inf values")
    return items


def _mixed_sizes(items: list[torch.Tensor]) -> bool:
    return any(i.shape != items[0].shape for i in items[1:])


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """B×H×W×C with C = 1, 3 or 4 → B×H×W×3 (grey repeated, alpha dropped), clamped to 0..1."""
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    elif x.shape[-1] == 4:
        x = x[..., :3]
    return x.clamp(0.0, 1.0)


def batch_size(images: Images) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def expand_prompts(prompts: Sequence[str] | str | None, n: int, needed: bool = True) -> list[str]:
    """One prompt per image: a single prompt is used for every image; any other count is refused."""
    if prompts is None or isinstance(prompts, str):
        prompts = [prompts or ""] if (prompts is not None or not needed) else None
    if prompts is None:
        raise RewardInputError("this reward compares images with their prompts: give one prompt per image")
    prompts = list(prompts)
    if len(prompts) == 1 and n > 1:
        return prompts * n
    if len(prompts) != n:
        raise RewardInputError(f"{n} images but {len(prompts)} prompts: give one prompt per image "
                               "(or a single prompt for all)")
    return [str(p) for p in prompts]
