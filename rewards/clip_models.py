"""CLIP-family rewards on Hugging Face folders: CLIPScore, PickScore, and the image/text encoders they share.

The models are loaded with transformers from the folder layout people download (config.json + weights +
preprocessor_config.json + tokenizer files), never from the hub, so the published folders work offline.
Image preprocessing is our torch version of the folder's CLIPImageProcessor (see preprocess.py); the
tokenizer is the folder's own.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .preprocess import ClipPreprocess, Images, batch_size, expand_prompts
from .weights import CLIPSCORE, PICKSCORE, BadWeightsError, MissingWeightsError, Published, require_hf_folder

log = logging.getLogger("texforce.rewards")

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def _from_pretrained(cls, folder: Path, published: Published, **kwargs):
    """transformers' from_pretrained, offline and in fp32 (v5 would otherwise keep the checkpoint's dtype)."""
    try:
        try:
            model = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32, **kwargs)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BadWeightsError(f"{folder} could not be loaded as {published.what} ({cls.__name__}): "
                              f"{type(e).__name__}: {str(e)[:400]}. Expected {published.describe()}") from None
    return model.float().eval().requires_grad_(False)


def _load_tokenizer(folder: Path, published: Published):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise MissingWeightsError(published, folder, "The folder has no tokenizer files (tokenizer.json, or "
                                                     "vocab.json + merges.txt + tokenizer_config.json).")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class ClipImageEncoder(nn.Module):
    """A CLIP vision tower with its projection: images → L2-normalised embeddings (B, D)."""

    def __init__(self, vision: nn.Module, preprocess: ClipPreprocess):
        super().__init__()
        self.vision, self.preprocess = vision, preprocess

    @classmethod
    def from_folder(cls, folder: str | Path, published: Published = CLIPSCORE) -> "ClipImageEncoder":
        """Vision tower only (CLIPVisionModelWithProjection reads it out of a full CLIPModel folder)."""
        from transformers import CLIPVisionModelWithProjection

        from transformers import AutoConfig, CLIPConfig

        folder = require_hf_folder(Path(folder), published)
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if isinstance(config, CLIPConfig):  # a full CLIP folder: the projection size lives at the top level
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
            config = vision_config
        # the text tower's weights in a full CLIP folder are expected to be skipped: keep transformers' load
        # report (a warning listing every skipped key) out of the ComfyUI log
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            vision = _from_pretrained(CLIPVisionModelWithProjection, folder, published, config=config)
        finally:
            hf_logging.set_verbosity(level)
        return cls(vision, ClipPreprocess.from_hf_folder(folder))

    def forward(self, images: Images) -> torch.Tensor:
        x = self.preprocess(images, device=_device_of(self))
        emb = self.vision(pixel_values=x).image_embeds
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ClipModelReward(nn.Module):
    """Shared part of CLIPScore and PickScore: a full CLIPModel, its tokenizer and preprocessing."""

    name = "clip"
    published: Published = CLIPSCORE

    def __init__(self, model: nn.Module, tokenizer, preprocess: ClipPreprocess):
        super().__init__()
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def from_folder(cls, folder: str | Path):
        from transformers import CLIPModel

        folder = require_hf_folder(Path(folder), cls.published)
        tokenizer = _load_tokenizer(folder, cls.published)
        model = _from_pretrained(CLIPModel, folder, cls.published)
        log.info("%s: loaded %s", cls.name, folder)
        return cls(model, tokenizer, ClipPreprocess.from_hf_folder(folder))

    def image_embeddings(self, images: Images) -> torch.Tensor:
        x = self.preprocess(images, device=_device_of(self))
        emb = self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        dev = _device_of(self)
        out = self.model.text_model(input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev))
        emb = self.model.text_projection(out.pooler_output)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def cosine(self, images: Images, prompts: Sequence[str] | str | None) -> torch.Tensor:
        prompts = expand_prompts(prompts, batch_size(images))
        if not any(p.strip() for p in prompts):
            log.warning("%s: every prompt is empty; scores then measure similarity to the empty text", self.name)
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


class ClipScoreReward(ClipModelReward):
    """CLIPScore (Hessel et al. 2021) as torchmetrics computes it: 100 × max(cos(image, text), 0).

    The factor 100 (torchmetrics' choice, not the paper's 2.5) puts typical scores around 20–35, the
    range people quote; the clamp keeps it non-negative as in the paper.
    """

    name = "clipscore"
    published = CLIPSCORE

    def forward(self, images: Images, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        return (100.0 * self.cosine(images, prompts).clamp_min(0.0)).float().cpu()


class PickScoreReward(ClipModelReward):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() × cos(image, text), about 18–23 for real images.

    This is the reference code's score before its softmax over candidate images, so it is comparable
    across batches (the softmax would make it depend on which images happen to be scored together).
    """

    name = "pickscore"
    published = PICKSCORE

    def forward(self, images: Images, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        scale = self.model.logit_scale.exp()
        return (scale * self.cosine(images, prompts)).float().cpu()

