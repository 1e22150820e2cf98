"""The in-memory form every LoRA format is read into and written from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Slots name a text encoder the way LoRA files do. "te" is the only (or first) encoder of a
# model, "te1"/"te2" are SDXL's and SD 3.x's CLIP-L/CLIP-G, "te3" T5-XXL (SD 3.x, Flux); ComfyUI's generic
# keys name the encoder directly.
SLOTS = ("te", "te1", "te2", "te3", "clip_l", "clip_g", "clip_h", "t5xxl")


class LoraFileError(ValueError):
    """A LoRA file that cannot be used; the message names the file and what to do."""


@dataclass
class LoraModule:
    """ΔW = (alpha / rank) · up @ down for one linear layer of a text encoder."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The full weight update, in fp32 (for tests, fusion and reports)."""
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass
class LoraSet:
    """All text-encoder modules of one file, keyed by (slot, module path in HF CLIPTextModel / T5EncoderModel naming).

    `other` keeps the tensors that are not text-encoder LoRA weights (U-Net parts, unknown keys)
    under their original names, so they can be handed to the U-Net loader or reported.
    """

    source: str
    format: str
    modules: dict[tuple[str, str], LoraModule] = field(default_factory=dict)
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def slots(self) -> list[str]:
        return sorted({slot for slot, _ in self.modules})

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def alphas(self) -> list[float]:
        return sorted({float(m.alpha) for m in self.modules.values()})
