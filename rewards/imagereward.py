"""ImageReward (Xu et al. 2023, THUDM): BLIP judges how well an image matches its prompt and how good it looks.

The published `ImageReward.pt` is a plain state dict of the reference model: a BLIP ViT-L/16 image encoder
(`blip.visual_encoder.*`, timm-style names), BLIP's BERT text encoder with cross-attention to the image
tokens (`blip.text_encoder.*`, names of BLIP's med.py) and an MLP head on the [CLS] output (`mlp.layers.*`,
the same 768-1024-128-64-16-1 layout as the LAION aesthetic head, so the same module loads it).

The `image-reward` package pins an old timm that conflicts with ComfyUI's, so it is not used. The backbone
is transformers' BLIP port (BlipVisionModel, BlipTextModel with cross-attention): a well-kept
implementation of the same computation, whose parameter names differ from the published ones only in the
vision tower. `map_state_dict` renames them; nothing is copied or re-implemented by hand.

Reference computation (ImageReward.score): text → bert-base-uncased tokenizer, padded to 35 tokens (its own
[CLS] first: the inference code does not swap in [ENC]); image → resize shortest side 224 bicubic, centre
crop 224, CLIP mean/std; text encoder over the prompt attending to all image tokens; MLP on the [CLS]
state; score = (raw − 0.16717) / 1.03334, about −2..2 for real images.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .aesthetic import AestheticHead
from .preprocess import CLIP_MEAN, CLIP_STD, ClipPreprocess, Images, batch_size, expand_prompts
from .weights import IMAGEREWARD, IMAGEREWARD_TOKENIZER, BadWeightsError, MissingWeightsError, load_pickle_state_dict

log = logging.getLogger("texforce.rewards")

RAW_MEAN = 0.16717362830052426  # ImageReward's normalisation of the MLP output
RAW_STD = 1.0333394966054072
MAX_TOKENS = 35  # the reference pads/truncates every prompt to 35 tokens
VISION_HEAD_DIM = 64  # BLIP's ViTs: base 768/12 heads, large 1024/16 heads
VISION_LN_EPS = 1e-6  # BLIP's ViT LayerNorm eps (transformers' BLIP config default is 1e-5)

# med_config.json as published next to ImageReward.pt (used when that file is not there)
MED_CONFIG = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "max_position_embeddings": 512, "hidden_act": "gelu",
              "layer_norm_eps": 1e-12, "pad_token_id": 0}

VISION = "blip.visual_encoder."
TEXT = "blip.text_encoder."
HEAD = "mlp."
# parts of the published file that the score does not use (BLIP's contrastive projections) and the
# position_ids buffer that BLIP's med.py saves but transformers rebuilds
UNUSED = ("blip.vision_proj.", "blip.text_proj.", TEXT + "embeddings.position_ids")

_VISION_RENAMES = [  # published (timm / BLIP vit.py) → transformers BlipVisionModel
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]


def vision_key(name: str) -> str:
    """A published `blip.visual_encoder.` key (without the prefix) → its transformers BlipVisionModel name."""
    for pattern, repl in _VISION_RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name  # unknown: left as is, so strict loading reports it


def map_state_dict(state: dict) -> tuple[dict, dict, dict, list[str]]:
    """Split the published state dict into (vision, text, head) state dicts with the transformers /
    AestheticHead names, plus the keys that were left out (unused parts and anything unknown)."""
    vision, text, head, left_out = {}, {}, {}, []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            left_out.append(key)
        elif key.startswith(UNUSED):
            left_out.append(key)
        elif key.startswith(VISION):
            vision[vision_key(key[len(VISION):])] = value
        elif key.startswith(TEXT):
            text[key[len(TEXT):]] = value  # BLIP's med.py and transformers' BlipText share the names
        elif key.startswith(HEAD):
            head[key[len(HEAD):]] = value
        else:
            left_out.append(key)
    return vision, text, head, left_out


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state for m in [re.match(pattern, k)] if m})


def vision_config(vision: dict):
    """BlipVisionConfig read off the tensor shapes (BLIP's ViT: 64-dim heads, LayerNorm eps 1e-6)."""
    from transformers import BlipVisionConfig

    try:
        pos, patch_w, fc1 = (vision["embeddings.position_embedding"], vision["embeddings.patch_embedding.weight"],
                             vision["encoder.layers.0.mlp.fc1.weight"])
    except KeyError as e:
        raise BadWeightsError(f"no {e.args[0]!r} in the vision tower") from None
    width, patch = int(pos.shape[-1]), int(patch_w.shape[-1])
    grid = math.isqrt(int(pos.shape[1]) - 1)
    if grid * grid != int(pos.shape[1]) - 1 or width % VISION_HEAD_DIM and width > VISION_HEAD_DIM:
        raise BadWeightsError(f"vision tower with {pos.shape[1]} positions and width {width} is not a BLIP ViT")
    return BlipVisionConfig(hidden_size=width, intermediate_size=int(fc1.shape[0]),
                            num_hidden_layers=_count(vision, r"encoder\.layers\.(\d+)\."),
                            num_attention_heads=max(1, width // VISION_HEAD_DIM), image_size=grid * patch,
                            patch_size=patch, hidden_act="gelu", layer_norm_eps=VISION_LN_EPS,
                            attention_dropout=0.0)


def text_config(text: dict, med: dict, encoder_width: int, tokenizer=None):
    """BlipTextConfig from med_config.json, with the sizes the tensors imply (they must agree)."""
    from transformers import BlipTextConfig

    try:
        words = text["embeddings.word_embeddings.weight"]
        inter = text["encoder.layer.0.intermediate.dense.weight"]
        positions = text["embeddings.position_embeddings.weight"]
    except KeyError as e:
        raise BadWeightsError(f"no {e.args[0]!r} in the text encoder") from None
    layers = _count(text, r"encoder\.layer\.(\d+)\.")
    implied = {"vocab_size": int(words.shape[0]), "hidden_size": int(words.shape[1]),
               "intermediate_size": int(inter.shape[0]), "num_hidden_layers": layers,
               "max_position_embeddings": int(positions.shape[0])}
    clash = {k: (med[k], v) for k, v in implied.items() if k in med and int(med[k]) != v}
    if clash:
        raise BadWeightsError("med_config.json does not match the weights (config, weights): " +
                              ", ".join(f"{k} {a} vs {b}" for k, (a, b) in clash.items()))
    return BlipTextConfig(**implied, num_attention_heads=int(med.get("num_attention_heads", 12)),
                          encoder_hidden_size=encoder_width, hidden_act=med.get("hidden_act", "gelu"),
                          layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
                          pad_token_id=int(med.get("pad_token_id", 0)), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, is_decoder=True,  # is_decoder: build cross-attention
                          **_special_ids(tokenizer))


def _special_ids(tokenizer) -> dict:
    """BLIP's text config names [DEC] as bos and [SEP] as sep/eos; unused by the score, but kept consistent."""
    if tokenizer is None:
        return {}
    return {"bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id}


def _load_strict(module: nn.Module, state: dict, what: str, path: Path) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BadWeightsError(f"{path} does not fit the ImageReward {what} (missing: {sorted(missing)[:6]}, "
                              f"unexpected: {sorted(unexpected)[:6]}). Expected {IMAGEREWARD.describe()}")


def load_tokenizer(folder: str | Path):
    """bert-base-uncased's WordPiece tokenizer from a local folder, with BLIP's [DEC] / [ENC] tokens added."""
    from transformers import BertTokenizer

    folder = Path(folder)
    if not (folder / "vocab.txt").is_file():
        raise MissingWeightsError(IMAGEREWARD_TOKENIZER, folder, "'vocab.txt' is missing from that folder."
                                  if folder.is_dir() else "")
    try:
        tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise BadWeightsError(f"{folder} could not be read as the BERT tokenizer: {type(e).__name__}: "
                              f"{str(e)[:300]}. Expected {IMAGEREWARD_TOKENIZER.describe()}") from None
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def read_med_config(path: Path | None) -> dict:
    if path is None or not Path(path).is_file():
        log.info("imagereward: no med_config.json (%s); using the published one's values", path)
        return dict(MED_CONFIG)
    try:
        return {**MED_CONFIG, **json.loads(Path(path).read_text(encoding="utf-8"))}
    except (OSError, ValueError) as e:
        raise BadWeightsError(f"{path} is not a readable med_config.json: {e}") from None


class ImageRewardModel(nn.Module):
    """BLIP vision tower + BLIP text encoder with cross-attention + the MLP head."""

    name = "imagereward"

    def __init__(self, vision: nn.Module, text: nn.Module, head: AestheticHead, tokenizer):
        super().__init__()
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        size = int(vision.config.image_size)
        self.preprocess = ClipPreprocess(size, size, CLIP_MEAN, CLIP_STD, crop_rounding="round")  # torchvision's

    @classmethod
    def from_files(cls, checkpoint: str | Path, tokenizer_folder: str | Path,
                   med_config: str | Path | None = None) -> "ImageRewardModel":
        """The published `ImageReward.pt` (+ its `med_config.json` next to it, if there) and a
        bert-base-uncased tokenizer folder; every tensor the score uses must be in the file."""
        from transformers import BlipTextModel, BlipVisionModel

        checkpoint = Path(checkpoint)
        state = load_pickle_state_dict(checkpoint, IMAGEREWARD)
        state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
        vision_sd, text_sd, head_sd, left_out = map_state_dict(state)
        if not vision_sd or not text_sd or not head_sd:
            raise BadWeightsError(f"{checkpoint} is not an ImageReward checkpoint: it needs blip.visual_encoder.*, "
                                  f"blip.text_encoder.* and mlp.layers.* keys (found: {sorted(state)[:6]}). "
                                  f"Expected {IMAGEREWARD.describe()}")
        tokenizer = load_tokenizer(tokenizer_folder)
        med = read_med_config(Path(med_config) if med_config else checkpoint.parent / "med_config.json")
        vcfg = vision_config(vision_sd)
        tcfg = text_config(text_sd, med, vcfg.hidden_size, tokenizer)
        if len(tokenizer) > tcfg.vocab_size:
            raise BadWeightsError(f"the tokenizer in {tokenizer_folder} has {len(tokenizer)} tokens but the text "
                                  f"encoder only {tcfg.vocab_size}; ImageReward uses bert-base-uncased")
        with torch.device("meta"):  # no random init of a 450M-parameter model that is overwritten right away
            vision, text = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
        vision.to_empty(device="cpu")
        text.to_empty(device="cpu")
        text.embeddings.position_ids = torch.arange(tcfg.max_position_embeddings).expand((1, -1))
        _load_strict(vision, vision_sd, "vision tower", checkpoint)
        _load_strict(text, text_sd, "text encoder", checkpoint)
        w0 = head_sd.get("layers.0.weight")
        if w0 is None or w0.ndim != 2 or int(w0.shape[1]) != tcfg.hidden_size:
            raise BadWeightsError(f"{checkpoint}: the MLP head (mlp.layers.0.weight) must take the "
                                  f"{tcfg.hidden_size}-dim text state")
        head = AestheticHead(int(w0.shape[1]))
        _load_strict(head, head_sd, "MLP head", checkpoint)
        unknown = [k for k in left_out if not k.startswith(UNUSED)]
        if unknown:
            log.info("imagereward: %d keys of %s are not used by the score: %s", len(unknown), checkpoint,
                     unknown[:5])
        log.info("imagereward: loaded %s (vision %d layers × %d, text %d layers × %d)", checkpoint,
                 vcfg.num_hidden_layers, vcfg.hidden_size, tcfg.num_hidden_layers, tcfg.hidden_size)
        model = cls(vision, text, head, tokenizer)
        return model.float().eval().requires_grad_(False)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt")

    def raw(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """MLP output before ImageReward's normalisation, from preprocessed pixels and tokens."""
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_mask, is_decoder=False)
        return self.head(out.last_hidden_state[:, 0, :]).squeeze(-1)

    def forward(self, images: Images, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        prompts = expand_prompts(prompts, batch_size(images))
        dev = next(self.vision.parameters()).device
        tok = self.tokenize(prompts)
        raw = self.raw(self.preprocess(images, device=dev), tok["input_ids"].to(dev),
                       tok["attention_mask"].to(dev))
        return ((raw - RAW_MEAN) / RAW_STD).float().cpu()
