"""Draw the per-epoch reward (mean and ±1 std band) as an IMAGE, with Pillow only."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 360, 64, 16, 28, 36


def reward_curve_image(means: list[float], stds: list[float], title: str = "reward per epoch") -> torch.Tensor:
    """A 1×H×W×3 float image (ComfyUI IMAGE) of the reward curve; a note instead of a curve when empty."""
    img = Image.new("RGB", (W, H), (250, 250, 250))
    d = ImageDraw.Draw(img)
    d.text((PAD_L, 8), title, fill=(20, 20, 20))
    x0, x1, y0, y1 = PAD_L, W - PAD_R, PAD_T, H - PAD_B
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    if means:
        m, s = np.asarray(means, dtype=float), np.asarray(stds or [0.0] * len(means), dtype=float)
        lo, hi = float(np.min(m - s)), float(np.max(m + s))
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        n = len(m)

        def px(i: float, v: float) -> tuple[float, float]:
            x = x0 + (x1 - x0) * (i / max(n - 1, 1))
            return x, y1 - (y1 - y0) * (v - lo) / (hi - lo)

        band = [px(i, v) for i, v in enumerate(m + s)] + [px(i, v) for i, v in reversed(list(enumerate(m - s)))]
        if n > 1:
            d.polygon(band, fill=(200, 220, 245))
            d.line([px(i, v) for i, v in enumerate(m)], fill=(30, 90, 200), width=2)
        for i, v in enumerate(m):
            cx, cy = px(i, v)
            d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=(30, 90, 200))
        for v in (lo, hi):
            d.text((4, px(0, v)[1] - 6), f"{v:.4g}", fill=(60, 60, 60))
        d.text((x0, y1 + 8), "epoch 1", fill=(60, 60, 60))
        d.text((x1 - 60, y1 + 8), f"epoch {n}", fill=(60, 60, 60))
    else:
        d.text((x0 + 10, (y0 + y1) // 2), "no finished epoch yet", fill=(60, 60, 60))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
