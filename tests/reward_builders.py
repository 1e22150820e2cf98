"""Tiny random reward models saved in the exact on-disk layouts of the published ones (test helper).

- Hugging Face CLIP folders (openai/clip-vit-large-patch14, PickScore_v1): config.json + model.safetensors
  written by transformers' save_pretrained, preprocessor_config.json + tokenizer files by CLIPProcessor
  (the tokenizer is the real CLIP BPE vocabulary that ships with ComfyUI).
- HPS v2.1: `HPS_v2.1_compressed.pt`, a torch pickle {"state_dict": open_clip model state dict}, for a tiny
  open_clip config registered under TINY_OPENCLIP (the real file is a ViT-H-14).
- The aesthetic head is the real published file, shipped with the tests in tests/data/aesthetic/ (see its README).
- ImageReward: `ImageReward.pt`, a torch pickle of the state dict under THUDM's key names (BLIP ViT + BERT with
  cross-attention + MLP head, tiny widths), with `med_config.json` beside it and a `bert-base-uncased/`
  tokenizer folder whose WordPiece vocab.txt is written by hand.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import COMFY_DIR, REPO

AESTHETIC_HEAD_FILE = REPO / "tests" / "data" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
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


def reward_models_folder(root: Path, hps: bool = False, imagereward: bool = False, detectors: bool = False) -> Path:
    """A models/reward_models folder as a user would fill it (published names)."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_hf_clip(root / "clip-vit-large-patch14", seed=1, projection_dim=768)
    tiny_hf_clip(root / "PickScore_v1", seed=2, logit_scale=4.6052)
    shutil.copy(AESTHETIC_HEAD_FILE, root / AESTHETIC_HEAD_FILE.name)
    if hps:
        tiny_hps_checkpoint(root / "HPS_v2.1_compressed.pt", seed=3)
    if imagereward:  # ImageReward.pt + med_config.json + bert-base-uncased/ in the folder itself
        tiny_imagereward(root, seed=4)
    if detectors:  # face and hand rewards
        tiny_yunet(root / "yunet_final.pth", seed=5)
        tiny_owl(root / "owlv2-base-patch16-ensemble", v2=True, seed=6)
    return root


# ---------------------------------------------------------------- ImageReward

IMAGEREWARD_WORDS = ["a", "an", "the", "photo", "of", "cat", "dog", "red", "cube", "astronaut", "riding", "horse",
                     "painting", "portrait", "woman", "man", "in", "on", "with", "and", "two", "blue", "sky"]


def tiny_bert_tokenizer(folder: Path) -> Path:
    """A bert-base-uncased-style tokenizer folder: a hand-written WordPiece vocab.txt + tokenizer_config.json.

    Same special tokens as bert-base-uncased ([PAD] first, [UNK], [CLS], [SEP], [MASK]), lower-casing on;
    single letters and ##letters make every lower-case word tokenizable.
    """
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + IMAGEREWARD_WORDS
             + [c for c in letters if c not in IMAGEREWARD_WORDS] + [f"##{c}" for c in letters]
             + list(".,!?'-") + [str(d) for d in range(10)])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}))
    return folder


def imagereward_published_state(vocab_size: int, seed: int = 0, vision_width: int = 64, vision_layers: int = 2,
                                patch: int = 32, image_size: int = 224, hidden: int = 32, text_layers: int = 2,
                                max_positions: int = 64) -> dict:
    """Random tensors under the key names and shapes of THUDM's ImageReward.pt.

    Names written out from the reference modules: BLIP's vit.py (timm VisionTransformer: cls_token, pos_embed,
    patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm), BLIP's med.py BertModel
    without pooler (embeddings incl. the saved position_ids buffer, encoder.layer.N.{attention,crossattention}.
    {self.query/key/value,output.dense/LayerNorm}, intermediate.dense, output.dense/LayerNorm), BLIP_Pretrain's
    vision_proj/text_proj, and ImageReward's MLP (mlp.layers.{0,2,4,6,7}).
    """
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    def ln(n):
        return {"weight": 1 + w(n, std=0.1), "bias": w(n)}

    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, tensors: dict):
        for k, v in tensors.items():
            out[prefix + k] = v

    W, n_patch = vision_width, (image_size // patch) ** 2
    v = "blip.visual_encoder."
    put(v, {"cls_token": w(1, 1, W), "pos_embed": w(1, n_patch + 1, W), "patch_embed.proj.weight": w(W, 3, patch, patch),
            "patch_embed.proj.bias": w(W)})
    for i in range(vision_layers):
        b = f"{v}blocks.{i}."
        put(b + "norm1.", ln(W))
        put(b + "attn.", {"qkv.weight": w(3 * W, W), "qkv.bias": w(3 * W), "proj.weight": w(W, W), "proj.bias": w(W)})
        put(b + "norm2.", ln(W))
        put(b + "mlp.", {"fc1.weight": w(4 * W, W), "fc1.bias": w(4 * W), "fc2.weight": w(W, 4 * W), "fc2.bias": w(W)})
    put(v + "norm.", ln(W))
    H, t = hidden, "blip.text_encoder."
    put(t + "embeddings.", {"position_ids": torch.arange(max_positions).expand((1, -1)).clone(),
                            "word_embeddings.weight": w(vocab_size, H, std=0.5),
                            "position_embeddings.weight": w(max_positions, H, std=0.5)})
    put(t + "embeddings.LayerNorm.", ln(H))
    for i in range(text_layers):
        b = f"{t}encoder.layer.{i}."
        for part, kv_in in (("attention", H), ("crossattention", W)):
            put(f"{b}{part}.self.", {"query.weight": w(H, H), "query.bias": w(H), "key.weight": w(H, kv_in),
                                     "key.bias": w(H), "value.weight": w(H, kv_in), "value.bias": w(H)})
            put(f"{b}{part}.output.", {"dense.weight": w(H, H), "dense.bias": w(H)})
            put(f"{b}{part}.output.LayerNorm.", ln(H))
        put(b, {"intermediate.dense.weight": w(4 * H, H), "intermediate.dense.bias": w(4 * H),
                "output.dense.weight": w(H, 4 * H), "output.dense.bias": w(H)})
        put(b + "output.LayerNorm.", ln(H))
    put("blip.", {"vision_proj.weight": w(256, W), "vision_proj.bias": w(256), "text_proj.weight": w(256, H),
                  "text_proj.bias": w(256)})
    for i, (o, n) in zip((0, 2, 4, 6, 7), ((1024, H), (128, 1024), (64, 128), (16, 64), (1, 16))):
        put(f"mlp.layers.{i}.", {"weight": w(o, n, std=1.0 / (n ** 0.5)), "bias": w(o, std=0.1)})
    return out


def tiny_imagereward(folder: Path, seed: int = 0, text_heads: int = 2) -> Path:
    """`ImageReward.pt` (a torch pickle of the state dict) + `med_config.json` next to it + `bert-base-uncased/`,
    as a user would lay them out in reward_models. Returns the .pt path."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = tiny_bert_tokenizer(folder / "bert-base-uncased")
    vocab = len(BertTokenizer.from_pretrained(str(tok_dir))) + 2  # + BLIP's [DEC] and [ENC]
    state = imagereward_published_state(vocab, seed=seed)
    H = int(state["blip.text_encoder.embeddings.word_embeddings.weight"].shape[1])
    (folder / "med_config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": H, "initializer_range": 0.02, "intermediate_size": 4 * H,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert",
        "num_attention_heads": text_heads, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
        "vocab_size": vocab, "encoder_width": 64, "add_cross_attention": True}, indent=2))
    path = folder / "ImageReward.pt"
    torch.save(state, path)
    return path


# ---------------------------------------------------------------- face (YuNet) and hand (OWL-ViT / OWLv2)

def tiny_yunet(path: Path, seed: int = 0) -> Path:
    """`yunet_final.pth` layout: kornia's YuNet state dict (the real file is this 87k-parameter model), random
    weights with BatchNorm statistics spread so that scores differ between images."""
    from kornia.contrib.face_detection import YuNet

    torch.manual_seed(seed)
    model = YuNet("train", pretrained=False)  # "train" runs the reference initialisation
    # calibrate the BatchNorm statistics on random BGR 0..255 images, so activations stay in range and the
    # scores depend on the image (with the initial statistics the signal dies out before the heads)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(4, 3, 128, 128, generator=g) * 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def tiny_owl(folder: Path, v2: bool = False, seed: int = 0, image_size: int = 96) -> Path:
    """An OWL-ViT (or OWLv2) detection folder: save_pretrained of a 2-layer model + its processor files, with the
    real CLIP BPE vocabulary that ships with ComfyUI (the published folders use the same tokenizer)."""
    from transformers import CLIPTokenizer

    if v2:
        from transformers import Owlv2Config as Config, Owlv2ForObjectDetection as Model
        from transformers import Owlv2ImageProcessor as ImageProcessor
    else:
        from transformers import OwlViTConfig as Config, OwlViTForObjectDetection as Model
        from transformers import OwlViTImageProcessor as ImageProcessor
    cfg = Config(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=16),
        projection_dim=32)  # the class head needs projection_dim == text width, as in the published configs
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    with torch.no_grad():  # random heads give logits of ±50; scale them so box probabilities spread over 0..1
        model.class_head.logit_scale.weight.mul_(0.02)
        model.class_head.logit_scale.bias.fill_(-0.5)
        model.class_head.logit_shift.bias.fill_(-12.0 if not v2 else 0.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    size = {"height": image_size, "width": image_size}
    proc = ImageProcessor(size=size) if v2 else ImageProcessor(size=size, crop_size=size)
    proc.save_pretrained(str(folder))
    tok_dir = COMFY_DIR / "comfy" / "sd1_tokenizer"
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="!").save_pretrained(str(folder))
    return folder
