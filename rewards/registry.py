"""Rewards by name, from local weight paths: what the headless trainer's config file selects.

A spec is a dict: {"kind": "aesthetic", "path": ..., "clip": ..., "weight": 1.0}. Relative paths are
resolved against `base_dir` (the config file's folder). One spec gives that reward; several give a
RewardMix (normalised by default, so the weights mean relative influence; see rewards/mix.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from .jpeg import JpegReward
from .mix import RewardMix


def _path(spec: dict[str, Any], key: str, base_dir: Path, kind: str) -> Path:
    if not spec.get(key):
        raise ValueError(f"reward {kind!r} needs '{key}': the local path of its weights")
    p = Path(str(spec[key])).expanduser()
    return p if p.is_absolute() else base_dir / p


def _aesthetic(spec, base):
    from .aesthetic import AestheticReward
    return AestheticReward.from_files(_path(spec, "clip", base, "aesthetic"), _path(spec, "path", base, "aesthetic"))


def _pickscore(spec, base):
    from .clip_models import PickScoreReward
    return PickScoreReward.from_folder(_path(spec, "path", base, "pickscore"))


def _clipscore(spec, base):
    from .clip_models import ClipScoreReward
    return ClipScoreReward.from_folder(_path(spec, "path", base, "clipscore"))


def _hps(spec, base):
    from .hps import HpsReward
    return HpsReward.from_checkpoint(_path(spec, "path", base, "hps"))


def _imagereward(spec, base):
    from .imagereward import ImageRewardModel
    return ImageRewardModel.from_files(_path(spec, "path", base, "imagereward"),
                                       _path(spec, "tokenizer", base, "imagereward"))


def _face(spec, base):
    from .detectors import FaceReward
    return FaceReward.from_file(_path(spec, "path", base, "face"))


def _hand(spec, base):
    from .detectors import HandReward
    return HandReward.from_folder(_path(spec, "path", base, "hand"))


def _diversity(spec, base):
    from .diversity import DiversityReward
    if spec.get("clip"):
        from .clip_models import ClipImageEncoder
        return DiversityReward(ClipImageEncoder.from_folder(_path(spec, "clip", base, "diversity")))
    return DiversityReward()


BUILDERS: dict[str, Callable[[dict[str, Any], Path], Any]] = {
    "jpeg_compressibility": lambda spec, base: JpegReward("compressibility", int(spec.get("quality", 95))),
    "jpeg_incompressibility": lambda spec, base: JpegReward("incompressibility", int(spec.get("quality", 95))),
    "aesthetic": _aesthetic,
    "pickscore": _pickscore,
    "clipscore": _clipscore,
    "hps": _hps,
    "imagereward": _imagereward,  # path: ImageReward.pt, tokenizer: a bert-base-uncased folder
    "face": _face,  # path: kornia YuNet yunet_final.pth
    "hand": _hand,  # path: an OWL-ViT / OWLv2 folder
    "diversity": _diversity,
}
KEYS = {"kind", "path", "clip", "weight", "quality", "tokenizer"}


def build_reward(spec: dict[str, Any], base_dir: str | Path = ".", device: torch.device | str = "cpu"):
    """One reward from its spec, its model (if any) on `device`, in eval mode."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a reward spec is a mapping with a 'kind', got {spec!r}")
    kind = str(spec["kind"])
    if kind not in BUILDERS:
        raise ValueError(f"unknown reward kind {kind!r}; choose one of {', '.join(sorted(BUILDERS))}")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ValueError(f"reward {kind!r}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(KEYS))}")
    reward = BUILDERS[kind](spec, Path(base_dir))
    if isinstance(reward, torch.nn.Module):
        reward = reward.to(device).eval()
    return reward


def build_rewards(specs: list[dict[str, Any]] | dict[str, Any], base_dir: str | Path = ".",
                  device: torch.device | str = "cpu", normalize: bool = True):
    """A reward, or a RewardMix of several with their `weight`s (default 1)."""
    specs = [specs] if isinstance(specs, dict) else list(specs)
    if not specs:
        raise ValueError("no reward given: list at least one reward (e.g. kind: jpeg_compressibility)")
    rewards = [build_reward(s, base_dir, device) for s in specs]
    if len(rewards) == 1 and float(specs[0].get("weight", 1.0)) == 1.0:
        return rewards[0]
    return RewardMix(rewards, [float(s.get("weight", 1.0)) for s in specs], normalize=normalize)
