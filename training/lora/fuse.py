"""Fuse LoRAs by weighted addition, exactly: the ranks are stacked, nothing is approximated.

Σ_i w_i·s_i·B_i·A_i = [w_1·s_1·B_1 | … | w_n·s_n·B_n] @ [A_1; …; A_n], so the fused module has
rank Σ r_i and alpha = rank (scale 1.0), and gives the same conditioning as stacking the inputs.
This is how TexForce combines LoRAs trained for different rewards.
"""
from __future__ import annotations

import torch

from .types import LoraModule, LoraSet


def fuse_loras(weighted: list[tuple[LoraSet, float]], source: str = "fused") -> LoraSet:
    """One LoRA equal to applying each input at its weight; modules missing from some inputs are fine."""
    parts: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for lora, weight in weighted:
        if weight == 0:
            continue
        for key, module in lora.modules.items():
            parts.setdefault(key, []).append((module, weight))
    fused = LoraSet(source=source, format="kohya")
    for key, items in parts.items():
        down = torch.cat([m.down.float() for m, _ in items], dim=0)
        up = torch.cat([m.up.float() * (w * m.scale) for m, w in items], dim=1)
        fused.modules[key] = LoraModule(down=down, up=up, alpha=float(down.shape[0]))
    fused.notes.append("fused from: " + ", ".join(f"{lora.source} ×{w:g}" for lora, w in weighted))
    return fused
