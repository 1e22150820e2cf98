"""Where each reward model's weights come from, and the error users see when they are missing.

Nothing can be downloaded at run time (ComfyUI users often run offline, and silent multi-GB downloads
surprise people), so every loader takes a local path and, when it is wrong, says which file is expected,
which folder to put it in and where it is published.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Published:
    """A published weight file or folder: the name users save it under and where to get it."""

    what: str
    name: str  # file name, or folder name ending in "/" for a Hugging Face folder
    source: str
    folder: str = "models/reward_models"
    contents: str = ""

    def describe(self) -> str:
        kind = "folder" if self.name.endswith("/") else "file"
        extra = f" ({self.contents})" if self.contents else ""
        return (f"{self.what}: expected the {kind} '{self.name}'{extra} in {self.folder}/ "
                f"(or a reward_models folder listed in extra_model_paths.yaml); it is published at {self.source}")


AESTHETIC_HEAD = Published(
    "LAION aesthetic predictor head", "sac+logos+ava1-l14-linearMSE.pth",
    "github.com/christophschuhmann/improved-aesthetic-predictor (also bundled in kvablack/ddpo-pytorch "
    "ddpo_pytorch/assets/)")
CLIP_L14 = Published(
    "CLIP ViT-L/14 (for the aesthetic predictor)", "clip-vit-large-patch14/",
    "huggingface.co/openai/clip-vit-large-patch14",
    contents="config.json, model.safetensors and preprocessor_config.json")
PICKSCORE = Published(
    "PickScore", "PickScore_v1/", "huggingface.co/yuvalkirstain/PickScore_v1 (processor files: "
    "huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    contents="config.json and the model weights, plus the processor's preprocessor_config.json, "
             "tokenizer files (vocab.json, merges.txt, tokenizer_config.json)")
CLIPSCORE = Published(
    "CLIPScore", "clip-vit-large-patch14/", "huggingface.co/openai/clip-vit-large-patch14 (any CLIP folder works)",
    contents="config.json, model weights, preprocessor_config.json and tokenizer files")
HPS_V21 = Published("HPS v2.1", "HPS_v2.1_compressed.pt", "huggingface.co/xswu/HPSv2 (HPS_v2.1_compressed.pt)")
HPS_V2 = Published("HPS v2", "HPS_v2_compressed.pt", "huggingface.co/xswu/HPSv2 (HPS_v2_compressed.pt)")
IMAGEREWARD = Published("ImageReward", "ImageReward.pt",
                        "huggingface.co/THUDM/ImageReward (ImageReward.pt; put its med_config.json next to it)")
IMAGEREWARD_TOKENIZER = Published(
    "BERT tokenizer for ImageReward", "bert-base-uncased/", "huggingface.co/google-bert/bert-base-uncased",
    contents="vocab.txt and tokenizer_config.json; the model weights are not needed")

FACE_YUNET = Published(
    "YuNet face detector (face reward)", "yunet_final.pth",
    "github.com/kornia/data/raw/main/yunet_final.pth (also huggingface.co/kornia/yunet)")
HAND_OWL = Published(
    "OWL-ViT / OWLv2 detector (hand reward)", "owlv2-base-patch16-ensemble/",
    "huggingface.co/google/owlv2-base-patch16-ensemble (or google/owlvit-base-patch32)",
    contents="config.json, model weights, preprocessor_config.json and tokenizer files")
HAND_OWL_V1 = Published(
    "OWL-ViT", "owlvit-base-patch32/", "huggingface.co/google/owlvit-base-patch32",
    contents="config.json, model weights, preprocessor_config.json and tokenizer files")


class MissingWeightsError(FileNotFoundError):
    """A reward model's weights are not where they should be; the message says what to put where."""

    def __init__(self, published: Published, looked_at: str | Path | None = None, detail: str = ""):
        where = f" Looked at: {looked_at}." if looked_at else ""
        more = f" {detail}" if detail else ""
        super().__init__(f"Missing {published.describe()}.{where}{more}")
        self.published, self.looked_at = published, looked_at


class BadWeightsError(ValueError):
    """A weight file exists but is not the expected model (wrong keys or shapes, a code pickle, corrupt)."""


def load_pickle_state_dict(path: Path, published: Published) -> dict:
    """torch.load with weights_only=True (a pickle that holds code is refused, never run)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(published, path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means "not a plain weights file"
        raise BadWeightsError(f"{path} could not be read as a plain weights file for {published.what} "
                              f"(torch.load with weights_only=True: {type(e).__name__}: {str(e)[:300]}). "
                              f"Expected {published.name} from {published.source}.") from None
    if not isinstance(obj, dict):
        raise BadWeightsError(f"{path} holds a {type(obj).__name__}, not a state dict; expected {published.name} "
                              f"from {published.source}")
    return obj


def require_hf_folder(folder: Path, published: Published, files: tuple[str, ...] = ("config.json",)) -> Path:
    """A Hugging Face model folder with its config and at least one weights file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingWeightsError(published, folder)
    for name in files:
        if not (folder / name).is_file():
            raise MissingWeightsError(published, folder, f"'{name}' is missing from that folder.")
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any((folder / w).is_file() for w in weights):
        raise MissingWeightsError(published, folder, "The folder has no model.safetensors or pytorch_model.bin.")
    return folder
