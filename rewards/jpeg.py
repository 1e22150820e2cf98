"""JPEG (in)compressibility, DDPO's simplest reward: the size of the image saved as JPEG at quality 95."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import check_batch


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image encoded as RGB JPEG (what DDPO's reward measures)."""
    check_batch(images)
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    sizes = []
    for img in arr:
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        buf = io.BytesIO()
        Image.fromarray(img[..., :3]).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward:
    """compressibility: −kB (smaller files are better); incompressibility: +kB."""

    def __init__(self, mode: str = "compressibility", quality: int = 95):
        if mode not in ("compressibility", "incompressibility"):
            raise ValueError(f"mode must be 'compressibility' or 'incompressibility', got {mode!r}")
        self.mode, self.quality = mode, quality
        self.name = f"jpeg_{mode}"

    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        kb = jpeg_kilobytes(images, self.quality)
        return -kb if self.mode == "compressibility" else kb
