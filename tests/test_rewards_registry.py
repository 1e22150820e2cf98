"""rewards/registry.py: the headless trainer's rewards by name give the same scores as the loaders they name."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import pack
from reward_builders import reward_models_folder

registry = importlib.import_module(f"{pack.__name__}.rewards.registry")
mix = importlib.import_module(f"{pack.__name__}.rewards.mix")
aesthetic = importlib.import_module(f"{pack.__name__}.rewards.aesthetic")
clip_models = importlib.import_module(f"{pack.__name__}.rewards.clip_models")
imagereward = importlib.import_module(f"{pack.__name__}.rewards.imagereward")
detectors = importlib.import_module(f"{pack.__name__}.rewards.detectors")
jpeg = importlib.import_module(f"{pack.__name__}.rewards.jpeg")

PROMPTS = ["a photo of a cat", "a red cube"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return reward_models_folder(tmp_path_factory.mktemp("reward_models"), imagereward=True, detectors=True)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))


CASES = {
    "aesthetic": ({"path": "sac+logos+ava1-l14-linearMSE.pth", "clip": "clip-vit-large-patch14"},
                  lambda f: aesthetic.AestheticReward.from_files(f / "clip-vit-large-patch14",
                                                                 f / "sac+logos+ava1-l14-linearMSE.pth")),
    "pickscore": ({"path": "PickScore_v1"}, lambda f: clip_models.PickScoreReward.from_folder(f / "PickScore_v1")),
    "clipscore": ({"path": "clip-vit-large-patch14"},
                  lambda f: clip_models.ClipScoreReward.from_folder(f / "clip-vit-large-patch14")),
    "imagereward": ({"path": "ImageReward.pt", "tokenizer": "bert-base-uncased"},
                    lambda f: imagereward.ImageRewardModel.from_files(f / "ImageReward.pt", f / "bert-base-uncased")),
    "face": ({"path": "yunet_final.pth"}, lambda f: detectors.FaceReward.from_file(f / "yunet_final.pth")),
    "hand": ({"path": "owlv2-base-patch16-ensemble"},
             lambda f: detectors.HandReward.from_folder(f / "owlv2-base-patch16-ensemble")),
    "jpeg_compressibility": ({}, lambda f: jpeg.JpegReward("compressibility")),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_registry_builds_the_named_reward(kind, folder, images):
    spec, direct = CASES[kind]
    built = registry.build_reward({"kind": kind, **spec}, base_dir=folder)  # relative paths: against base_dir
    with torch.no_grad():
        got, want = built(images, PROMPTS), direct(folder)(images, PROMPTS)
    assert got.shape == (2,) and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)


def test_several_rewards_make_a_weighted_mix(folder, images):
    r = registry.build_rewards([{"kind": "jpeg_compressibility", "weight": 2.0}, {"kind": "diversity", "weight": 0.5}],
                               base_dir=folder, normalize=False)
    assert isinstance(r, mix.RewardMix) and r.weights == [2.0, 0.5]
    raw = r.score_components(images, PROMPTS)
    torch.testing.assert_close(r.combine(raw), 2.0 * raw[:, 0] + 0.5 * raw[:, 1])


def test_bad_specs_are_clear(folder):
    with pytest.raises(ValueError, match="unknown reward kind 'aesthtic'; choose one of"):
        registry.build_reward({"kind": "aesthtic"})
    with pytest.raises(ValueError, match="reward 'aesthetic' needs 'clip'"):
        registry.build_reward({"kind": "aesthetic", "path": "x.pth"}, base_dir=folder)
    with pytest.raises(ValueError, match="unknown key"):
        registry.build_reward({"kind": "jpeg_compressibility", "wieght": 1})
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        registry.build_reward({"kind": "imagereward", "path": "missing/ImageReward.pt", "tokenizer": "bert-base-uncased"},
                              base_dir=folder)
    with pytest.raises(ValueError, match="no reward given"):
        registry.build_rewards([])
