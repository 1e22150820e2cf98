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
weights = importlib.import_module(f"{pack.__name__}.rewards.weights")

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
    # a missing path names the model, its file and where it is published, and the accepted alternative
    with pytest.raises(ValueError, match=r"reward 'hps' needs 'path': the local path of HPS v2\.1: "
                                         r"'HPS_v2\.1_compressed\.pt', published at huggingface\.co/xswu/HPSv2.*"
                                         r"or HPS v2: 'HPS_v2_compressed\.pt'"):
        registry.build_reward({"kind": "hps"})
    # keys are checked per kind: a setting another kind takes is refused
    with pytest.raises(ValueError, match="'pickscore': unknown key.s. quality; valid keys are kind, path, weight"):
        registry.build_reward({"kind": "pickscore", "path": "PickScore_v1", "quality": 90}, base_dir=folder)


def test_a_kind_is_found_by_its_name_or_by_the_label_saved_workflows_hold():
    labels = {"aesthetic (LAION, CLIP ViT-L/14)": "aesthetic", "PickScore": "pickscore", "HPS v2 / v2.1": "hps",
              "CLIPScore": "clipscore", "ImageReward": "imagereward", "face (YuNet detection confidence)": "face",
              "hand (OWL-ViT / OWLv2 detection confidence)": "hand"}
    for label, name in labels.items():
        assert registry.reward_kind(label) is registry.reward_kind(name) is registry.KINDS[name]
    with pytest.raises(ValueError, match="unknown reward kind 'PickScore v2'; choose one of jpeg_compressibility"):
        registry.reward_kind("PickScore v2")


def _find_in(folder):
    def find(entry, slot, wanted):
        path = folder / entry
        if not path.exists():
            raise weights.MissingWeightsError(wanted, path)
        return path
    return find


@pytest.mark.parametrize("kind, preferred, fallback", [
    ("hps", "HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt"),
    ("hand", "owlv2-base-patch16-ensemble/", "owlvit-base-patch32/")])
def test_auto_takes_the_first_published_weights_that_are_there(tmp_path, kind, preferred, fallback):
    entry, find = registry.reward_kind(kind), _find_in(tmp_path)
    with pytest.raises(weights.MissingWeightsError) as e:
        registry.locate(entry, {}, find)
    message = str(e.value)
    assert f"'{preferred}'" in message and f"({fallback}) works too" in message and str(tmp_path) in message
    (tmp_path / fallback).mkdir() if fallback.endswith("/") else (tmp_path / fallback).write_bytes(b"")
    assert registry.locate(entry, {}, find) == {"path": tmp_path / fallback}
    (tmp_path / preferred).mkdir() if preferred.endswith("/") else (tmp_path / preferred).write_bytes(b"")
    assert registry.locate(entry, {}, find) == {"path": tmp_path / preferred}
    # an entry given is taken as given: no fallback behind the user's back
    with pytest.raises(weights.MissingWeightsError, match="mine"):
        registry.locate(entry, {"path": "mine"}, find)


def test_optional_weights_stay_out_and_companions_are_watched(tmp_path):
    find = _find_in(tmp_path)
    assert registry.locate(registry.reward_kind("diversity"), {}, find) == {}
    ir = registry.reward_kind("imagereward")
    for name in ("ImageReward.pt", "bert-base-uncased"):
        (tmp_path / name).write_bytes(b"")
    paths = registry.locate(ir, {"tokenizer": "bert-base-uncased"}, find)
    assert registry.watched_files(ir, paths) == [tmp_path / "ImageReward.pt", tmp_path / "bert-base-uncased"]
    (tmp_path / "med_config.json").write_text("{}")
    assert registry.watched_files(ir, paths) == [tmp_path / "ImageReward.pt", tmp_path / "med_config.json",
                                                 tmp_path / "bert-base-uncased"]
