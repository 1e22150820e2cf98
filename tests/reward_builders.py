"""Tiny random reward models saved in the exact on-disk layouts of the published ones (test helper).

- Hugging Face CLIP folders (openai/clip-vit-large-patch14, PickScore_v1): config.json + model.safetensors
  written by transformers' save_pretrained, preprocessor_config.json + tokenizer files by CLIPProcessor
  (the tokenizer is the real CLIP BPE vocabulary that ships with ComfyUI).
- HPS v2.1: `HPS_v2.1_compressed.pt`, a torch pickle {"state_dict": open_clip model state dict}, for a tiny
  open_clip config registered under TINY_OPENCLIP (the real file is a ViT-H-14).
- The aesthetic head is the real published file from ../shared/data/aesthetic/.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import COMFY_DIR, REPO

AESTHETIC_HEAD_FILE = REPO.parent / "shared" / "data" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
TINY_OPENCLIP = "texforce-tiny-openclip"


def tiny_hf_clip(folder: Path, seed: int = 0, projection_dim: int = 16, image_size: int = 224,
                 logit_scale: float | None = None) -> Path:
    """A 2-layer CLIPModel (width 32) with the real tokenizer, saved as a Hugging Face folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=32),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok_dir = COMFY_DIR / "comfy" / "sd1_tokenizer"
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    # the published folders' files: preprocessor_config.json, tokenizer.json/tokenizer_config.json, vocab + merges
    image_processor.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / name, folder / name)
    return folder


def tiny_openclip_config(dir_: Path) -> str:
    """Register a tiny open_clip architecture (same code path as ViT-H-14, 2 layers, width 32)."""
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    path = dir_ / f"{TINY_OPENCLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_OPENCLIP


def tiny_hps_checkpoint(path: Path, seed: int = 0) -> Path:
    """`HPS_v2.1_compressed.pt` layout: {"state_dict": open_clip model.state_dict()}."""
    import open_clip

    tiny_openclip_config(path.parent)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPENCLIP, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def reward_models_folder(root: Path, hps: bool = False) -> Path:
    """A models/reward_models folder as a user would fill it (published names)."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_hf_clip(root / "clip-vit-large-patch14", seed=1, projection_dim=768)
    tiny_hf_clip(root / "PickScore_v1", seed=2, logit_scale=4.6052)
    shutil.copy(AESTHETIC_HEAD_FILE, root / AESTHETIC_HEAD_FILE.name)
    if hps:
        tiny_hps_checkpoint(root / "HPS_v2.1_compressed.pt", seed=3)
    return root
