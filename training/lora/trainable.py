"""The LoRA being trained: plain torch parameters keyed like our LoRA files, so saving is a re-keying."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .family_detect import describe_lora
from .types import LoraFileError, LoraModule, LoraSet
from .write import kohya_state_dict


class TrainableLora(torch.nn.Module):
    """ΔW = (alpha/rank)·up@down per target linear. PEFT's init: down Kaiming-uniform, up zero, so ΔW = 0 at start."""

    def __init__(self, shapes: dict[tuple[str, str], tuple[int, int]], rank: int = 16, alpha: float = 16.0,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.keys = sorted(shapes)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.enabled = True
        self.family: str | None = None  # set by the host when it knows the model family (for messages)
        g = torch.Generator().manual_seed(seed)
        downs, ups = [], []
        for key in self.keys:
            out_f, in_f = shapes[key]
            down = torch.empty(self.rank, in_f, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=g)
            downs.append(torch.nn.Parameter(down.to(device, dtype)))
            ups.append(torch.nn.Parameter(torch.zeros(out_f, self.rank, dtype=dtype, device=device)))
        self.down = torch.nn.ParameterList(downs)
        self.up = torch.nn.ParameterList(ups)

    def delta(self, index: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        up, down = self.up[index], self.down[index]
        return (up.to(device, dtype) @ down.to(device, dtype)) * self.scale

    def to_lora_set(self, source: str = "trained") -> LoraSet:
        lora = LoraSet(source=source, format="kohya")
        for key, down, up in zip(self.keys, self.down, self.up):
            lora.modules[key] = LoraModule(down=down.detach().float().cpu(), up=up.detach().float().cpu(), alpha=self.alpha)
        return lora

    def kohya_state(self) -> dict[str, torch.Tensor]:
        return kohya_state_dict(self.to_lora_set())

    def describe(self) -> str:
        """The family (when the host set it), the slots and widths this LoRA trains, for error messages."""
        return describe_lora(self.to_lora_set(), family=self.family)

    def load_lora_set(self, lora: LoraSet) -> None:
        """Load weights of exactly this layout (resume); see fit_lora."""
        shapes = {key: (int(up.shape[0]), int(down.shape[1])) for key, down, up in zip(self.keys, self.down, self.up)}
        weights = fit_lora(lora, shapes, self.rank, self.alpha, self.describe)
        with torch.no_grad():
            for i, key in enumerate(self.keys):
                self.down[i].copy_(weights[key][0])
                self.up[i].copy_(weights[key][1])


def fit_lora(lora: LoraSet, shapes: dict[tuple[str, str], tuple[int, int]], rank: int, alpha: float,
             trains: Callable[[], str]) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per key of a run's LoRA layout (`shapes`: key -> (out, in)) from a LoRA of exactly that layout,
    with any alpha difference folded into `up` so ΔW stays exact under the run's alpha (both hosts resume
    through it). A LoRA of another family, or of another choice of encoders, is refused naming both (`trains`
    describes the run's): loading only the overlap would silently drop the rest."""
    keys = sorted(shapes)
    missing = [k for k in keys if k not in lora.modules]
    extra = sorted(set(lora.modules) - set(shapes))
    shaped = [k for k in keys if k in lora.modules and
              (tuple(lora.modules[k].down.shape[1:]) != shapes[k][1:] or
               tuple(lora.modules[k].up.shape[:1]) != shapes[k][:1])]
    if missing or extra or shaped:
        raise LoraFileError(
            f"{lora.source}: its LoRA is for {describe_lora(lora)}, but this run trains {trains()} "
            f"({len(missing)} module(s) missing, {len(extra)} extra, {len(shaped)} of another shape; e.g. "
            f"{(missing + extra + shaped)[0]}). Resume with the checkpoint and text-encoder choice it was "
            "trained with, or start a new run.")
    scale = float(alpha) / int(rank)
    out = {}
    for key in keys:
        m = lora.modules[key]
        if m.rank != rank:
            raise LoraFileError(f"{lora.source}: {key[1]} has rank {m.rank}, this run uses rank {rank}.")
        out[key] = (m.down, m.up * (m.scale / scale))
    return out
