"""Reward nodes in-process and in a real server: model folder, cache, device management, scoring, training."""
from __future__ import annotations

import os
import shutil

import folder_paths
import pytest
import torch

import conftest  # noqa: F401  (ComfyUI and the pack as texforce_pack)
from reward_builders import (AESTHETIC_HEAD_FILE, reward_models_folder, tiny_hf_clip, tiny_imagereward,
                             tiny_owl)

from texforce_pack.nodes import reward_nodes as rn  # noqa: E402
from texforce_pack.rewards import registry  # noqa: E402
from texforce_pack.rewards.base import RewardInputError  # noqa: E402
from texforce_pack.rewards.weights import MissingWeightsError  # noqa: E402

AESTHETIC = "aesthetic (LAION, CLIP ViT-L/14)"


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    return reward_models_folder(tmp_path_factory.mktemp("rm") / "reward_models", imagereward=True, detectors=True)


@pytest.fixture
def reward_dir(filled, monkeypatch):
    """reward_models registered as that one folder (as extra_model_paths.yaml would add it)."""
    exts = folder_paths.folder_names_and_paths[rn.FOLDER][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, rn.FOLDER, ([str(filled)], exts))
    folder_paths.filename_list_cache.pop(rn.FOLDER, None)
    rn._cache.clear()
    yield filled
    folder_paths.filename_list_cache.pop(rn.FOLDER, None)
    rn._cache.clear()


@pytest.fixture
def empty_dir(tmp_path, monkeypatch):
    d = tmp_path / "reward_models"
    d.mkdir()
    exts = folder_paths.folder_names_and_paths[rn.FOLDER][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, rn.FOLDER, ([str(d)], exts))
    folder_paths.filename_list_cache.pop(rn.FOLDER, None)
    yield d
    folder_paths.filename_list_cache.pop(rn.FOLDER, None)


def test_folder_is_registered_and_lists_hf_folders_and_files(reward_dir):
    assert rn.FOLDER in folder_paths.folder_names_and_paths
    entries = rn.list_entries()
    # the tokenizer folder (no config.json) and med_config.json are not offered as models
    assert entries == ["PickScore_v1/", "clip-vit-large-patch14/", "owlv2-base-patch16-ensemble/", "ImageReward.pt",
                       "sac+logos+ava1-l14-linearMSE.pth", "yunet_final.pth"]
    spec = rn.TexForceRewardModelLoader.define_schema()
    model_input = next(i for i in spec.inputs if i.id == "model")
    assert model_input.options == [rn.AUTO] + entries and spec.category == "TexForce/rewards"


def test_missing_weights_name_the_file_the_folder_and_the_source(empty_dir):
    for kind, expect in [(AESTHETIC, "sac+logos+ava1-l14-linearMSE.pth"), ("PickScore", "PickScore_v1/"),
                         ("HPS v2 / v2.1", "HPS_v2.1_compressed.pt"), ("CLIPScore", "clip-vit-large-patch14/"),
                         ("ImageReward", "ImageReward.pt"), ("face (YuNet detection confidence)", "yunet_final.pth"),
                         ("hand (OWL-ViT / OWLv2 detection confidence)", "owlv2-base-patch16-ensemble/")]:
        with pytest.raises(MissingWeightsError) as e:
            rn.TexForceRewardModelLoader.execute(kind, rn.AUTO, rn.AUTO)
        msg = str(e.value)
        assert expect in msg and "models/reward_models" in msg and ("huggingface.co" in msg or "github.com" in msg)
        assert str(empty_dir) in msg
    # the head is there but not its CLIP: the CLIP folder is what the error names
    shutil.copy(AESTHETIC_HEAD_FILE, empty_dir / AESTHETIC_HEAD_FILE.name)
    folder_paths.filename_list_cache.pop(rn.FOLDER, None)
    with pytest.raises(MissingWeightsError, match="clip-vit-large-patch14/.*openai/clip-vit-large-patch14"):
        rn.TexForceRewardModelLoader.execute(AESTHETIC, rn.AUTO, rn.AUTO)
    # ImageReward.pt is there but not the tokenizer folder: the error names bert-base-uncased/ and vocab.txt
    shutil.copy(tiny_imagereward(empty_dir.parent / "ir_src", seed=5), empty_dir / "ImageReward.pt")
    folder_paths.filename_list_cache.pop(rn.FOLDER, None)
    with pytest.raises(MissingWeightsError, match="bert-base-uncased/.*vocab.txt") as e:
        rn.TexForceRewardModelLoader.execute("ImageReward", rn.AUTO, rn.AUTO)
    assert "google-bert/bert-base-uncased" in str(e.value) and str(empty_dir) in str(e.value)
    # an HF folder without weights
    (empty_dir / "PickScore_v1").mkdir()
    (empty_dir / "PickScore_v1" / "config.json").write_text("{}")
    folder_paths.filename_list_cache.pop(rn.FOLDER, None)
    with pytest.raises(MissingWeightsError, match="no model.safetensors"):
        rn.TexForceRewardModelLoader.execute("PickScore", "PickScore_v1/")


def test_auto_falls_back_to_the_older_published_weights(empty_dir):
    """'auto' takes HPS v2 when v2.1 is not there, and OWL-ViT when OWLv2 is not; the loader builds from it."""
    (empty_dir / "HPS_v2_compressed.pt").write_bytes(b"")
    tiny_owl(empty_dir / "owlvit-base-patch32", seed=6)
    folder_paths.filename_list_cache.pop(rn.FOLDER, None)
    hps = registry.locate(registry.reward_kind("HPS v2 / v2.1"), {}, rn.find_entry)
    assert hps == {"path": empty_dir / "HPS_v2_compressed.pt"}
    with torch.inference_mode():
        hand = rn.TexForceRewardModelLoader.execute("hand (OWL-ViT / OWLv2 detection confidence)", rn.AUTO).args[0]
    assert hand.reward.model.config.model_type == "owlvit"
    assert hand(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))).shape == (1,)
    rn._cache.clear()


def test_loader_caches_by_path_and_mtime_and_uses_comfy_model_management(reward_dir):
    import comfy.model_management as mm

    with torch.inference_mode():  # how ComfyUI runs nodes
        r1 = rn.TexForceRewardModelLoader.execute("PickScore", rn.AUTO).args[0]
        r2 = rn.TexForceRewardModelLoader.execute("PickScore", "PickScore_v1/").args[0]
        assert r1 is r2 and r1.name == "pickscore"
        scores = r1(torch.rand(2, 64, 64, 3), ["a cat", "a dog"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert any(m.model is r1.patcher for m in mm.current_loaded_models)  # loaded through load_models_gpu
    assert r1.patcher.load_device == mm.get_torch_device()
    # a new file at that path (new mtime) is loaded again
    cfg = reward_dir / "PickScore_v1" / "config.json"
    st = cfg.stat()
    os.utime(cfg, (st.st_atime, st.st_mtime + 5))
    r3 = rn.TexForceRewardModelLoader.execute("PickScore", rn.AUTO).args[0]
    assert r3 is not r1
    # ImageReward: the .pt, its med_config.json and the tokenizer folder found by their published names
    with torch.inference_mode():
        ir = rn.TexForceRewardModelLoader.execute("ImageReward", rn.AUTO, rn.AUTO).args[0]
        assert rn.TexForceRewardModelLoader.execute("ImageReward", "ImageReward.pt", "bert-base-uncased/").args[0] is ir
    s_ir = ir(torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(1)), ["a cat", "a dog", "a red cube"])
    assert ir.name == "imagereward" and s_ir.shape == (3,) and torch.isfinite(s_ir).all()
    assert any(m.model is ir.patcher for m in mm.current_loaded_models)
    # face and hand rewards by their published names; both ignore prompts
    images = torch.rand(2, 80, 96, 3, generator=torch.Generator().manual_seed(2))
    for kind, name in [("face (YuNet detection confidence)", "face"), ("hand (OWL-ViT / OWLv2 detection confidence)",
                                                                     "hand")]:
        with torch.inference_mode():
            r = rn.TexForceRewardModelLoader.execute(kind, rn.AUTO, rn.AUTO).args[0]
        s = r(images, ["a", "b"])
        assert r.name == name and s.shape == (2,) and ((s >= 0) & (s <= 1)).all() and torch.equal(s, r(images))
    # scoring outside inference mode (as the training loop does) with models loaded inside it
    a = rn.TexForceRewardModelLoader.execute(AESTHETIC, rn.AUTO, rn.AUTO).args[0]
    assert torch.isfinite(a(torch.rand(2, 64, 64, 3), None)).all()


def test_score_images_sorts_best_first_with_top_k_table_mean_and_ui(reward_dir):
    images = torch.stack([torch.full((32, 32, 3), v) for v in (0.2, 0.9, 0.5, 0.7)])

    class Brightness:
        name = "brightness"

        def __call__(self, imgs, prompts):
            assert len(prompts) == imgs.shape[0]
            return imgs.mean(dim=(1, 2, 3))

    out = rn.TexForceScoreImages.execute(images, Brightness(), "a photo", 2)
    scores, mean, table, best = out.args
    assert scores == pytest.approx([0.2, 0.9, 0.5, 0.7]) and mean == pytest.approx(0.575)
    assert torch.equal(best, images[[1, 3]])
    lines = table.splitlines()
    assert lines[0].split("\t")[:3] == ["rank", "image", "brightness"] and len(lines) == 3
    assert lines[1].startswith("1\t1\t0.9") and "a photo" in lines[1]
    assert "brightness: mean 0.575" in out.ui.as_dict()["text"][0]
    all_sorted = rn.TexForceScoreImages.execute(images, Brightness(), "", 0).args[3]
    assert torch.equal(all_sorted, images[[1, 3, 2, 0]])
    # one prompt per line per image; a wrong count is refused
    seen = []

    class Record(Brightness):
        def __call__(self, imgs, prompts):
            seen.append(list(prompts))
            return super().__call__(imgs, prompts)

    rn.TexForceScoreImages.execute(images, Record(), "a\nb\n\nc\nd\n", 0)
    assert seen[-1] == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="4 images but 2 prompt lines"):
        rn.TexForceScoreImages.execute(images, Record(), "a\nb", 0)
    # a NaN score sorts last, the mean is over finite scores
    nan = rn.TexForceScoreImages.execute(images, lambda i, p: torch.tensor([1.0, float("nan"), 3.0, 2.0]), "", 0)
    assert torch.equal(nan.args[3], images[[2, 3, 0, 1]]) and nan.args[1] == pytest.approx(2.0)


def test_mix_and_diversity_nodes_with_a_model_reward(reward_dir):
    jpeg = rn.TexForceJPEGReward.execute("compressibility", 95).args[0]
    div = rn.TexForceDiversityReward.execute("pixels (no model)").args[0]
    div_clip = rn.TexForceDiversityReward.execute("clip-vit-large-patch14/").args[0]
    aes = rn.TexForceRewardModelLoader.execute(AESTHETIC, rn.AUTO, rn.AUTO).args[0]
    mix = rn.TexForceRewardMix.execute(jpeg, 1.0, True, reward_2=aes, weight_2=2.0, reward_3=div, weight_3=0.5,
                                       reward_4=None, weight_4=9.0).args[0]
    assert mix.weights == [1.0, 2.0, 0.5] and mix.name == "mix(1×jpeg_compressibility, 2×aesthetic, 0.5×diversity_pixels)"
    images = torch.rand(4, 48, 48, 3, generator=torch.Generator().manual_seed(0))
    out = rn.TexForceScoreImages.execute(images, mix, "a cat", 0)
    assert len(out.args[0]) == 4 and all(map(lambda s: s == s, out.args[0]))
    header = out.args[2].splitlines()[0].split("\t")
    assert header[3:6] == ["jpeg_compressibility", "aesthetic", "diversity_pixels"]
    assert div_clip.name == "diversity_cosine" and div_clip(images).shape == (4,)
    with pytest.raises(RewardInputError, match="at least 2 images"):
        rn.TexForceScoreImages.execute(images[:1], div, "", 0)


# ---------------------------------------------------------------- real server

def _fill_server_folder(server):
    target = server.base / "models" / "reward_models"
    if not (target / "clip-vit-large-patch14").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        tiny_hf_clip(target / "clip-vit-large-patch14", seed=1, projection_dim=768)
        shutil.copy(AESTHETIC_HEAD_FILE, target / AESTHETIC_HEAD_FILE.name)
    return target


def test_server_samples_scores_and_saves_the_sorted_top_k(server):
    _fill_server_folder(server)
    info = server.object_info("TexForceRewardModelLoader")["TexForceRewardModelLoader"]
    assert info["category"] == "TexForce/rewards"
    options = info["input"]["required"]["model"][1]["options"]
    assert "sac+logos+ava1-l14-linearMSE.pth" in options and "clip-vit-large-patch14/" in options
    prompt = {
        "1": {"class_type": "TexForceTestTinyCheckpoint", "inputs": {"family": "sd1", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "TexForceRewardModelLoader", "inputs": {
            "kind": AESTHETIC, "model": rn.AUTO, "clip_model": "clip-vit-large-patch14/"}},
        "8": {"class_type": "TexForceScoreImages", "inputs": {
            "images": ["6", 0], "reward": ["7", 0], "prompt": "a photo of a cat", "top_k": 2}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 3], "filename_prefix": "srv_best"}},
    }
    entry = server.run(prompt, timeout=180)
    assert entry["status"]["status_str"] == "success"
    assert len(entry["outputs"]["9"]["images"]) == 2
    text = entry["outputs"]["8"]["text"][0]
    assert text.startswith("aesthetic: mean") and len(text.splitlines()) == 2 + 2  # summary, header, 2 rows


def test_server_trains_one_epoch_on_a_mixed_reward(server):
    import json

    _fill_server_folder(server)
    prompt = {
        "1": {"class_type": "TexForceTestTinyCheckpoint", "inputs": {"family": "sd1", "seed": 0}},
        "2": {"class_type": "TexForceJPEGReward", "inputs": {"mode": "compressibility", "quality": 95}},
        "3": {"class_type": "TexForceRewardModelLoader", "inputs": {
            "kind": AESTHETIC, "model": "sac+logos+ava1-l14-linearMSE.pth", "clip_model": rn.AUTO}},
        "4": {"class_type": "TexForceDiversityReward", "inputs": {"embedding": "pixels (no model)"}},
        "5": {"class_type": "TexForceRewardMix", "inputs": {
            "reward_1": ["2", 0], "weight_1": 1.0, "reward_2": ["3", 0], "weight_2": 1.0,
            "reward_3": ["4", 0], "weight_3": 0.5, "weight_4": 1.0, "normalize": True}},
        "6": {"class_type": "TexForceTrain", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["5", 0],
            "prompts": "a photo of a cat\na photo of a dog", "preset": "texforce", "epochs": 1,
            "images_per_epoch": 4, "images_per_prompt": 2, "batch_size": 2, "width": 64, "height": 64,
            "steps": 3, "guidance": 5.0, "eta": 1.0, "learning_rate": 3e-4, "lora_rank": 4, "kl_weight": -1.0,
            "advantage": "batch", "seed": 0, "lora_name": "srv_mix", "resume": False}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 2], "filename_prefix": "srv_mix_curve"}},
    }
    entry = server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    assert (server.base / "models" / "loras" / "texforce" / "srv_mix.safetensors").is_file()
    history = server.base / "output" / "texforce" / "srv_mix" / "history.jsonl"
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["n_dropped"] == 0
