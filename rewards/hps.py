"""HPS v2 / v2.1 (Human Preference Score, Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human choices.

The published checkpoints (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) hold the full open_clip model's
state dict (under "state_dict", or bare). The score is the reference's: the cosine between the normalised
image and text features (no logit scale), about 0.2–0.35 for real images.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .preprocess import CLIP_MEAN, CLIP_STD, ClipPreprocess, Images, batch_size, expand_prompts
from .weights import HPS_V2, HPS_V21, BadWeightsError, Published, load_pickle_state_dict

log = logging.getLogger("texforce.rewards")


def published_for(path: str | Path) -> Published:
    return HPS_V21 if "2.1" in Path(path).name else HPS_V2


class HpsReward(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, preprocess: ClipPreprocess, version: str = "v2.1"):
        super().__init__()
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.name = f"hps{version}"

    @classmethod
    def from_checkpoint(cls, path: str | Path, model_name: str = "ViT-H-14") -> "HpsReward":
        """Build open_clip's `model_name` architecture (no pretrained download) and load the HPS state dict."""
        import open_clip

        path = Path(path)
        published = published_for(path)
        ckpt = load_pickle_state_dict(path, published)
        state = ckpt.get("state_dict", ckpt)
        if not isinstance(state, dict) or not state:
            raise BadWeightsError(f"{path} holds no state dict; expected {published.describe()}")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BadWeightsError(f"{path} does not fit open_clip {model_name} (HPS v2 is a ViT-H-14): "
                                  f"{str(e)[:400]}") from None
        model = model.float().eval().requires_grad_(False)
        visual = model.visual
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        size = visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pre = ClipPreprocess(size, size, tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD)),
                             crop_rounding="round")  # torchvision's CenterCrop
        version = "v2.1" if published is HPS_V21 else "v2"
        log.info("hps%s: loaded %s (%s)", version, path, model_name)
        return cls(model, open_clip.get_tokenizer(model_name), pre, version)

    def forward(self, images: Images, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        prompts = expand_prompts(prompts, batch_size(images))
        dev = next(self.model.parameters()).device
        img = self.model.encode_image(self.preprocess(images, device=dev), normalize=True)
        txt = self.model.encode_text(self.tokenizer(prompts).to(dev), normalize=True)
        return (img * txt).sum(-1).float().cpu()
