"""TexForceTrain in a real ComfyUI server: runs through /prompt, saves a listed LoRA, resumes, and survives Cancel."""
from __future__ import annotations

import json
import time

import pytest
import torch
from comfy_server import ComfyError

from conftest import pack


def train_prompt(name: str, epochs: int, images: int = 4, resume: bool = True, steps: int = 3, family: str = "sd1",
                 **extra) -> dict:
    return {
        "1": {"class_type": "TexForceTestTinyCheckpoint", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "TexForceJPEGReward", "inputs": {"mode": "compressibility", "quality": 95}},
        "3": {"class_type": "TexForceTrain", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["2", 0],
            "prompts": "a photo of a cat\na photo of a dog", "preset": "texforce", "epochs": epochs,
            "images_per_epoch": images, "images_per_prompt": 2, "batch_size": 2, "width": 64, "height": 64,
            "steps": steps, "guidance": 5.0, "eta": 1.0, "learning_rate": 3e-4, "lora_rank": 4, "kl_weight": -1.0,
            "advantage": "batch", "seed": 0, "lora_name": name, "resume": resume, **extra}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 2], "filename_prefix": f"{name}_curve"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 3], "filename_prefix": f"{name}_samples"}},
    }


def history_lines(server, name: str) -> list[dict]:
    path = server.base / "output" / "texforce" / name / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_train_node_runs_saves_a_listed_lora_and_resumes(server):
    entry = server.run(train_prompt("srv_run", epochs=2), timeout=300)
    assert entry["status"]["status_str"] == "success"
    lora = server.base / "models" / "loras" / "texforce" / "srv_run.safetensors"
    assert lora.is_file() and len(history_lines(server, "srv_run")) == 2
    spec = server.object_info("TexForceLoraLoader")["TexForceLoraLoader"]["input"]["optional"]["lora_1"]
    assert "texforce/srv_run.safetensors" in spec[1]["options"]
    assert len(entry["outputs"]["4"]["images"]) == 1 and len(entry["outputs"]["5"]["images"]) == 4
    trained = pack.training.lora.read_lora(lora)
    assert len(trained.modules) == 12 and trained.metadata["texforce.epoch"] == "2"
    # Resume: the same run continued to 3 epochs trains one more epoch, not three.
    entry = server.run(train_prompt("srv_run", epochs=3), timeout=300)
    assert entry["status"]["status_str"] == "success"
    assert [h["epoch"] for h in history_lines(server, "srv_run")] == [1, 2, 3]
    # resume off with an existing run refuses instead of overwriting it
    with pytest.raises(ComfyError, match="exists.*resume"):
        server.run(train_prompt("srv_run", epochs=4, resume=False), timeout=120)


def test_cancel_keeps_the_last_finished_epoch_loadable_and_resumable(server):
    prompt_id = server.queue(train_prompt("srv_cancel", epochs=200, images=8, steps=5))
    deadline = time.time() + 240
    while not history_lines(server, "srv_cancel"):
        assert time.time() < deadline, "no epoch finished in time"
        time.sleep(0.2)
    server.post_json("/interrupt", {})
    with pytest.raises(ComfyError):
        server.wait(prompt_id, timeout=240)
    done = len(history_lines(server, "srv_cancel"))
    assert 1 <= done < 200
    lora = pack.training.lora.read_lora(server.base / "models" / "loras" / "texforce" / "srv_cancel.safetensors")
    assert int(lora.metadata["texforce.epoch"]) == done
    ckpt = server.base / "output" / "texforce" / "srv_cancel" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == done
    entry = server.run(train_prompt("srv_cancel", epochs=done + 1, images=8, steps=5), timeout=300)
    assert entry["status"]["status_str"] == "success"
    assert [h["epoch"] for h in history_lines(server, "srv_cancel")] == list(range(1, done + 2))


def test_sdxl_trains_clip_g_only_and_writes_a_te2_file(server):
    """One short epoch on the tiny SDXL checkpoint with text_encoders = clip_g: the file holds lora_te2_ keys only,
    q/k/v/out of every CLIP-G layer; resuming it with another choice or another family is refused."""
    entry = server.run(train_prompt("srv_xl_te2", epochs=1, steps=2, family="sdxl", text_encoders="clip_g"),
                       timeout=300)
    assert entry["status"]["status_str"] == "success"
    path = server.base / "models" / "loras" / "texforce" / "srv_xl_te2.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    layers = 4  # tiny CLIP-G
    assert keys == {f"lora_te2_text_model_encoder_layers_{i}_self_attn_{p}_proj.{part}"
                    for i in range(layers) for p in ("q", "k", "v", "out")
                    for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert meta["texforce.family"] == "sdxl" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["texforce.encoders"] == "clip_g" and meta["texforce.epoch"] == "1"
    assert [h["epoch"] for h in history_lines(server, "srv_xl_te2")] == [1]
    with pytest.raises(ComfyError, match=r"run 'srv_xl_te2' trained CLIP-G .*this setting trains CLIP-G \+ CLIP-L"):
        server.run(train_prompt("srv_xl_te2", epochs=2, steps=2, family="sdxl", text_encoders="all"), timeout=120)
    with pytest.raises(ComfyError, match=r"run 'srv_xl_te2' was trained on SDXL \(CLIP-L \+ CLIP-G\) .*but this "
                                         r"CLIP is SD 1\.x \(CLIP-L\)"):
        server.run(train_prompt("srv_xl_te2", epochs=2, steps=2, family="sd1"), timeout=120)


def test_an_encoder_the_checkpoint_lacks_is_refused_by_the_node(server):
    with pytest.raises(ComfyError, match=r"cannot train CLIP-G: this CLIP is SD 1\.x \(CLIP-L\), which has CLIP-L only"):
        server.run(train_prompt("srv_sd1_te2", epochs=1, steps=2, text_encoders="clip_g"), timeout=120)


@pytest.mark.parametrize("family,encoders,slots", [("sd3", "all", {"te1", "te2", "te3"}), ("flux", "t5xxl", {"te3"})])
def test_flow_families_train_through_the_server_and_resume(server, family, encoders, slots):
    """SD 3.x (all three encoders) and Flux (T5 only) from the tiny checkpoint node: a run trains, writes a kohya file
    with the family's slots (T5 as te3) and metadata, and resumes for one more epoch."""
    from safetensors import safe_open

    name = f"srv_{family}_{encoders}"
    run = dict(steps=2, family=family, text_encoders=encoders, guidance=3.5, advantage="group_mean")
    entry = server.run(train_prompt(name, epochs=1, **run), timeout=300)
    assert entry["status"]["status_str"] == "success"
    path = server.base / "models" / "loras" / "texforce" / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {key.split("_", 2)[1] for key in keys} == slots
    t5 = {key for key in keys if key.startswith("lora_te3_")}
    assert len(t5) == 2 * 4 * 3 and all("_encoder_block_" in key and "_SelfAttention_" in key for key in t5)
    assert meta["texforce.family"] == family and meta["ss_base_model_version"] == {"sd3": "sd3", "flux": "flux1"}[family]
    entry = server.run(train_prompt(name, epochs=2, **run), timeout=300)
    assert entry["status"]["status_str"] == "success"
    assert [h["epoch"] for h in history_lines(server, name)] == [1, 2]
    assert pack.training.lora.read_lora(path).metadata["texforce.epoch"] == "2"
