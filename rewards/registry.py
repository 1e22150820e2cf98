"""Every reward by kind: the one table the reward nodes and the headless trainer both build rewards from.

A kind lists its weight slots (the spec keys `path`, `clip`, `tokenizer`) and, for each, the published weights
it expects, preferred first (HPS v2.1 before v2, OWLv2 before OWL-ViT). Where files are looked up differs by
caller, so the caller passes a `Find`: the nodes look entries up in models/reward_models/ and, for 'auto',
try the published names in order; the headless trainer's config names every path itself, relative to the
config file's folder.

A headless spec is a dict: {"kind": "aesthetic", "path": ..., "clip": ..., "weight": 1.0}. One spec gives that
reward; several give a RewardMix (normalised by default, so the weights mean relative influence; see mix.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from . import weights as published
from .aesthetic import AestheticReward
from .clip_models import ClipImageEncoder, ClipScoreReward, PickScoreReward
from .detectors import FaceReward, HandReward
from .diversity import DiversityReward
from .hps import HpsReward
from .imagereward import ImageRewardModel
from .jpeg import JpegReward
from .mix import RewardMix
from .weights import MissingWeightsError, Published


@dataclass(frozen=True)
class Slot:
    """One set of weights a reward needs: its spec key and what is published for it, preferred first."""

    key: str
    published: tuple[Published, ...]
    marker: str = "config.json"  # the file that identifies a folder entry (a name ending in "/")
    folder_only: bool = False  # a folder even when the entry has no trailing "/" (a tokenizer folder)
    companions: tuple[str, ...] = ()  # files beside the weights that belong to them
    optional: bool = False  # the reward works without it

    def wanted(self) -> str:
        """What to give, for error messages: every accepted published model and where it comes from."""
        return "; or ".join(f"{p.what}: '{p.name}', published at {p.source}" for p in self.published)


Paths = dict[str, Path]
# find(entry, slot, published) -> the full path of that entry; raises MissingWeightsError naming `published`
Find = Callable[[str, Slot, Published], Path]


@dataclass(frozen=True)
class RewardKind:
    """A reward as users select it: its kind name, the label the node shows, its weights and its builder."""

    name: str
    label: str
    build: Callable[[Paths, Mapping[str, Any]], Any]  # (located weights, spec settings) -> reward
    slots: tuple[Slot, ...] = ()
    settings: tuple[str, ...] = ()  # spec keys that are settings, not weights

    def keys(self) -> set[str]:
        return {"kind", "weight", *(s.key for s in self.slots), *self.settings}


def _jpeg(mode: str) -> Callable[[Paths, Mapping[str, Any]], JpegReward]:
    return lambda paths, spec: JpegReward(mode, int(spec.get("quality", 95)))


def _diversity(paths: Paths, spec: Mapping[str, Any]) -> DiversityReward:
    return DiversityReward(ClipImageEncoder.from_folder(paths["clip"]) if "clip" in paths else None)


_ALL = (
    RewardKind("jpeg_compressibility", "JPEG compressibility", _jpeg("compressibility"), settings=("quality",)),
    RewardKind("jpeg_incompressibility", "JPEG incompressibility", _jpeg("incompressibility"), settings=("quality",)),
    RewardKind("aesthetic", "aesthetic (LAION, CLIP ViT-L/14)",
               lambda paths, spec: AestheticReward.from_files(paths["clip"], paths["path"]),
               (Slot("path", (published.AESTHETIC_HEAD,)), Slot("clip", (published.CLIP_L14,)))),
    RewardKind("pickscore", "PickScore", lambda paths, spec: PickScoreReward.from_folder(paths["path"]),
               (Slot("path", (published.PICKSCORE,)),)),
    RewardKind("hps", "HPS v2 / v2.1", lambda paths, spec: HpsReward.from_checkpoint(paths["path"]),
               (Slot("path", (published.HPS_V21, published.HPS_V2)),)),
    RewardKind("clipscore", "CLIPScore", lambda paths, spec: ClipScoreReward.from_folder(paths["path"]),
               (Slot("path", (published.CLIPSCORE,)),)),
    RewardKind("imagereward", "ImageReward",
               lambda paths, spec: ImageRewardModel.from_files(paths["path"], paths["tokenizer"]),
               (Slot("path", (published.IMAGEREWARD,), companions=("med_config.json",)),
                Slot("tokenizer", (published.IMAGEREWARD_TOKENIZER,), marker="vocab.txt", folder_only=True))),
    RewardKind("face", "face (YuNet detection confidence)", lambda paths, spec: FaceReward.from_file(paths["path"]),
               (Slot("path", (published.FACE_YUNET,)),)),
    RewardKind("hand", "hand (OWL-ViT / OWLv2 detection confidence)",
               lambda paths, spec: HandReward.from_folder(paths["path"]),
               (Slot("path", (published.HAND_OWL, published.HAND_OWL_V1)),)),
    RewardKind("diversity", "diversity", _diversity, (Slot("clip", (published.CLIPSCORE,), optional=True),)),
)
KINDS: dict[str, RewardKind] = {k.name: k for k in _ALL}
# saved workflows store the node's label ("PickScore"), configs the kind name ("pickscore"): both select it
_BY_LABEL = {k.label: k for k in _ALL}


def reward_kind(name: str) -> RewardKind:
    """A kind by its name or by the label the Reward Model Loader node shows (what saved workflows hold)."""
    found = KINDS.get(name) or _BY_LABEL.get(name)
    if found is None:
        raise ValueError(f"unknown reward kind {name!r}; choose one of {', '.join(KINDS)}")
    return found


def locate(kind: RewardKind, entries: Mapping[str, Any], find: Find) -> Paths:
    """Each slot's weights: its entry, or with none the first of its published names that `find` finds.
    An optional slot without an entry is left out."""
    paths: Paths = {}
    for slot in kind.slots:
        entry = entries.get(slot.key)
        if entry:
            paths[slot.key] = find(str(entry), slot, slot.published[0])
        elif not slot.optional:
            paths[slot.key] = _first_published(slot, find)
    return paths


def _first_published(slot: Slot, find: Find) -> Path:
    """The preferred published weights, else the next accepted ones; none there: the error names them all."""
    first, *others = slot.published
    try:
        return find(first.name, slot, first)
    except MissingWeightsError as e:
        if not others:
            raise
        missing = e
    for alt in others:
        try:
            return find(alt.name, slot, alt)
        except MissingWeightsError:
            continue
    also = "; ".join(f"{p.what} ({p.name})" for p in others)
    raise MissingWeightsError(first, missing.looked_at, f"{also} works too.") from None


def watched_files(kind: RewardKind, paths: Paths) -> list[Path]:
    """The located weights and their companion files that exist: what a loaded reward depends on."""
    files = []
    for slot in kind.slots:
        if slot.key in paths:
            files.append(paths[slot.key])
            files += [c for c in (paths[slot.key].parent / n for n in slot.companions) if c.is_file()]
    return files


def _relative_to(base_dir: Path) -> Find:
    def find(entry: str, slot: Slot, wanted: Published) -> Path:
        p = Path(entry).expanduser()
        return p if p.is_absolute() else base_dir / p
    return find


def build_reward(spec: dict[str, Any], base_dir: str | Path = ".", device: torch.device | str = "cpu"):
    """One reward from a headless spec, its model (if any) on `device`, in eval mode. A config names every
    weight path (relative ones against `base_dir`): nothing is looked up by published name behind its back."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a reward spec is a mapping with a 'kind', got {spec!r}")
    kind = reward_kind(str(spec["kind"]))
    unknown = sorted(set(spec) - kind.keys())
    if unknown:
        raise ValueError(f"reward {kind.name!r}: unknown key(s) {', '.join(unknown)}; "
                         f"valid keys are {', '.join(sorted(kind.keys()))}")
    for slot in kind.slots:
        if not slot.optional and not spec.get(slot.key):
            raise ValueError(f"reward {kind.name!r} needs '{slot.key}': the local path of {slot.wanted()}")
    reward = kind.build(locate(kind, spec, _relative_to(Path(base_dir))), spec)
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
