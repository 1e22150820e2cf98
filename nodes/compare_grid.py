"""A before/after grid as an IMAGE: one column per prompt (its text under the column), rows before and after."""
from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw


def compare_grid(before: torch.Tensor, after: torch.Tensor, prompts: list[str], scale: int = 2,
                 scores: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """1×H×W×3 float image: row 1 `before`, row 2 `after` (B×h×w×3 each), the prompt under each column and,
    with `scores`, each image's score in its corner."""
    n, h, w = before.shape[0], before.shape[1] * scale, before.shape[2] * scale
    label_w, chars = 64, max(8, w // 6)
    lines = [textwrap.wrap(p, chars)[:4] for p in prompts]
    text_h = 12 * max(1, max(len(x) for x in lines)) + 6
    canvas = Image.new("RGB", (label_w + n * (w + 4), 2 * (h + 4) + text_h), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    for row, (label, images) in enumerate((("before", before), ("after", after))):
        y = row * (h + 4)
        draw.text((4, y + h // 2 - 6), label, fill=(20, 20, 20))
        arr = (images[..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        for i in range(n):
            x = label_w + i * (w + 4)
            canvas.paste(Image.fromarray(arr[i]).resize((w, h), Image.NEAREST), (x, y))
            if scores is not None:
                draw.text((x + 2, y + 2), f"{float(scores[row][i]):.2f}", fill=(255, 0, 255))
    for i, text in enumerate(lines):
        for j, line in enumerate(text):
            draw.text((label_w + i * (w + 4), 2 * (h + 4) + 2 + 12 * j), line, fill=(20, 20, 20))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]
