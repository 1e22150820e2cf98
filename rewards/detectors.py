"""Face and hand rewards for TexForce's face/hand applications: how confidently a detector finds them.

TexForce rewarded hands with the highest hand-detector confidence in the image (a Keras YOLO) and faces with
pyiqa's `topiq_nr-face`. Neither can be used here: pyiqa needs transformers>=5, bitsandbytes, datasets and
more, and downloads its weights at run time; mediapipe wheels that still ship their face/hand models
(<= 0.10.21) pin numpy<2, and newer ones ship no models at all. So both rewards are built on detectors from
libraries ComfyUI already installs, with weights the user puts in `models/reward_models`:

- face: YuNet from kornia (a ComfyUI requirement; 87k parameters, `yunet_final.pth`). Per image, the best
  face score over all anchors, sqrt(face probability × predicted IoU) as YuNet/libfacedetection define it:
  about 0.9 for a clear frontal face, low for a garbled one or none. A detection-confidence proxy for face
  quality, not a learned face-IQA model.
- hand: OWL-ViT / OWLv2 zero-shot detection through transformers, queried with "a photo of a human hand":
  the highest box probability (sigmoid of the class logit) in the image, the analogue of TexForce's
  max-over-grid hand confidence.

Both are computed with torch ops from the image tensor, so gradients flow where the detector allows it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .preprocess import CLIP_MEAN, CLIP_STD, Images, expand_prompts, split_images, to_rgb
from .weights import FACE_YUNET, HAND_OWL, BadWeightsError, load_pickle_state_dict, require_hf_folder

log = logging.getLogger("texforce.rewards")

HAND_QUERY = "a photo of a human hand"


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def yunet_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Scale so the longer side is `long_side`, each side rounded to a multiple of 64 (YuNet's coarsest stride)."""
    s = long_side / max(h, w)
    return max(64, int(round(h * s / 64)) * 64), max(64, int(round(w * s / 64)) * 64)


class FaceReward(nn.Module):
    """Best YuNet face score per image, 0..1 (prompts are ignored)."""

    name = "face"

    def __init__(self, model: nn.Module, long_side: int = 640):
        super().__init__()
        self.model, self.long_side = model, int(long_side)

    @classmethod
    def from_file(cls, path: str | Path, long_side: int = 640) -> "FaceReward":
        """kornia's YuNet architecture with the published `yunet_final.pth` (weights_only, strict keys)."""
        from kornia.contrib.face_detection import YuNet

        state = load_pickle_state_dict(Path(path), FACE_YUNET)
        model = YuNet("test", pretrained=False)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BadWeightsError(f"{path} is not YuNet's yunet_final.pth: {str(e)[:400]}. "
                                  f"Expected {FACE_YUNET.describe()}") from None
        log.info("face: YuNet from %s", path)
        return cls(model.float().eval().requires_grad_(False), long_side)

    def bgr_input(self, img: torch.Tensor) -> torch.Tensor:
        """One H×W×C image in 0..1 → 1×3×h×w, BGR in 0..255 (what YuNet was trained on), resized."""
        x = to_rgb(img.unsqueeze(0)).permute(0, 3, 1, 2)
        size = yunet_size(x.shape[-2], x.shape[-1], self.long_side)
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x.flip(1) * 255.0

    def forward(self, images: Images, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        items = split_images(images)
        if prompts is not None and not isinstance(prompts, str):
            expand_prompts(prompts, len(items))
        dev = _device_of(self.model)
        scores = []
        for img in items:  # sizes may differ per image; YuNet is small, so one at a time costs little
            out = self.model(self.bgr_input(img.to(dev, torch.float32)))
            face = (out["conf"][..., 1] * out["iou"][..., 0].clamp(0.0, 1.0)).clamp_min(0.0).sqrt()
            scores.append(face.amax(dim=-1))
        return torch.cat(scores).float().cpu()


class HandReward(nn.Module):
    """Highest OWL-ViT / OWLv2 box probability for a hand query, 0..1 per image (prompts are ignored)."""

    name = "hand"

    def __init__(self, model: nn.Module, tokenizer, size: int, pad_square: bool, query: str = HAND_QUERY,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        self.model, self.size, self.pad_square, self.query = model, int(size), pad_square, query
        self.mean, self.std = tuple(mean), tuple(std)
        tok = tokenizer([query], padding="max_length", truncation=True,
                        max_length=int(model.config.text_config.max_position_embeddings), return_tensors="pt")
        self.register_buffer("input_ids", tok["input_ids"], persistent=False)
        self.register_buffer("attention_mask", tok["attention_mask"], persistent=False)

    @classmethod
    def from_folder(cls, folder: str | Path, query: str = HAND_QUERY) -> "HandReward":
        """A Hugging Face OWL-ViT (owlvit) or OWLv2 (owlv2) detection folder, with its processor files."""
        import json

        from transformers import AutoConfig, AutoTokenizer

        from .clip_models import _from_pretrained

        folder = require_hf_folder(Path(folder), HAND_OWL)
        model_type = AutoConfig.from_pretrained(str(folder), local_files_only=True).model_type
        if model_type == "owlvit":
            from transformers import OwlViTForObjectDetection as Detector
        elif model_type == "owlv2":
            from transformers import Owlv2ForObjectDetection as Detector
        else:
            raise BadWeightsError(f"{folder} holds a {model_type!r} model, not OWL-ViT / OWLv2. "
                                  f"Expected {HAND_OWL.describe()}")
        model = _from_pretrained(Detector, folder, HAND_OWL)
        size = int(model.config.vision_config.image_size)
        pre = folder / "preprocessor_config.json"
        cfg = json.loads(pre.read_text(encoding="utf-8")) if pre.is_file() else {}
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        log.info("hand: %s from %s, query %r", model_type, folder, query)
        return cls(model, tokenizer, size, model_type == "owlv2", query, cfg.get("image_mean", CLIP_MEAN),
                   cfg.get("image_std", CLIP_STD))

    def pixels(self, img: torch.Tensor) -> torch.Tensor:
        """OWL-ViT: resize to size×size (bicubic); OWLv2: pad to a square with grey 0.5 at the bottom/right
        first, then resize (bilinear); both then CLIP mean/std. 1×3×size×size."""
        x = to_rgb(img.unsqueeze(0)).permute(0, 3, 1, 2)
        mode = "bicubic"
        if self.pad_square:
            h, w = x.shape[-2:]
            side = max(h, w)
            x = F.pad(x, (0, side - w, 0, side - h), value=0.5)
            mode = "bilinear"
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode=mode, align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images: Images, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        items = split_images(images)
        if prompts is not None and not isinstance(prompts, str):
            expand_prompts(prompts, len(items))
        dev = _device_of(self.model)
        pixels = torch.cat([self.pixels(img.to(dev, torch.float32)) for img in items])
        n = pixels.shape[0]
        out = self.model(input_ids=self.input_ids.to(dev).expand(n, -1),
                         attention_mask=self.attention_mask.to(dev).expand(n, -1), pixel_values=pixels)
        return torch.sigmoid(out.logits[..., 0]).amax(dim=-1).float().cpu()
