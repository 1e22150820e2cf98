"""The pack in a real ComfyUI server: node registration with tooltips, and a LoRA workflow through /prompt."""
from __future__ import annotations

import pytest
from comfy_server import ComfyError
from conftest import tiny_models
from lora_builders import as_kohya, random_lora, write_peft_folder
from safetensors.torch import save_file


def test_pack_loads_without_errors_and_lists_nodes_with_tooltips(server):
    log = server.log_path.read_text()
    assert "ComfyUI-TexForce" in log and "IMPORT FAILED" not in "\n".join(
        line for line in log.splitlines() if "TexForce" in line)
    info = server.object_info()
    for node in ("TexForceLoraLoader", "TexForceLoraFuse"):
        assert info[node]["category"] == "TexForce/loaders"
        inputs = {**info[node]["input"]["required"], **info[node]["input"].get("optional", {})}
        assert inputs["clip"][1]["tooltip"] and inputs["lora_1"][1]["tooltip"]
    assert info["TexForceLoraLoader"]["display_name"] == "TexForce LoRA Loader"
    assert info["TexForceLoraLoader"]["output_name"] == ["CLIP", "MODEL", "report"]


def test_two_loras_encode_and_sample_through_prompt(server):
    loras = server.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    clip = tiny_models.tiny_clip("sd1", 0)
    save_file({k: v.contiguous() for k, v in as_kohya(random_lora(clip, seed=1)).items()}, str(loras / "srv_kohya.safetensors"))
    write_peft_folder(loras / "srv_texforce_sd15", random_lora(clip, seed=2), lora_alpha=4, r=4)
    spec = server.object_info("TexForceLoraLoader")["TexForceLoraLoader"]["input"]["optional"]["lora_1"]
    listed = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert {"srv_kohya.safetensors", "srv_texforce_sd15/adapter_model.bin"} <= set(listed)
    prompt = {
        "1": {"class_type": "TexForceTestTinyCheckpoint", "inputs": {"family": "sd1", "seed": 0}},
        "2": {"class_type": "TexForceLoraLoader", "inputs": {
            "clip": ["1", 1], "model": ["1", 0],
            "lora_1": "srv_kohya.safetensors", "strength_1": 0.8, "on_1": True,
            "lora_2": "srv_texforce_sd15/adapter_model.bin", "strength_2": 1.0, "on_2": True}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a photo of a cat"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 1], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "texforce_lora_test"}},
    }
    entry = server.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "success"
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 1 and (server.base / "output" / images[0]["filename"]).is_file()


def test_bad_lora_fails_the_prompt_with_the_file_named(server):
    loras = server.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "srv_broken.safetensors").write_bytes(b"\x00" * 100)
    prompt = {
        "1": {"class_type": "TexForceTestTinyCheckpoint", "inputs": {"family": "sd1", "seed": 0}},
        "2": {"class_type": "TexForceLoraLoader", "inputs": {"clip": ["1", 1], "lora_1": "srv_broken.safetensors"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "x"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "x"}},
    }
    with pytest.raises(ComfyError, match=r"srv_broken\.safetensors.*truncated or corrupt"):
        server.run(prompt, timeout=120)


def execution_error(server, prompt: dict) -> dict:
    """Queue a prompt that must fail; the execution_error ComfyUI reports (exception_type, exception_message, ...)."""
    prompt_id = server.queue(prompt)
    with pytest.raises(ComfyError):
        server.wait(prompt_id, timeout=120)
    messages = server.get_json(f"/history/{prompt_id}")[prompt_id]["status"]["messages"]
    return next(data for event, data in messages if event == "execution_error")


def _fuse_prompt(save_name: str, lora: str, overwrite: bool = False) -> dict:
    return {"1": {"class_type": "TexForceTestTinyCheckpoint", "inputs": {"family": "sd1", "seed": 0}},
            "2": {"class_type": "TexForceLoraFuse", "inputs": {"clip": ["1", 1], "save_name": save_name,
                                                               "overwrite": overwrite, "lora_1": lora, "weight_1": 0.5}}}


def test_fuse_never_answers_from_the_cache_with_a_file_that_is_gone(server):
    """Queued again after its file was deleted, Fuse writes it again (it used to report the cached lora_path of
    the deleted file); queued again while the file exists, with overwrite off, it is refused (it used to
    'succeed'). Errors name the file relative to the models folder, with a short exception name."""
    loras = server.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in as_kohya(random_lora(tiny_models.tiny_clip("sd1", 0), seed=3)).items()},
              str(loras / "srv_fuse_src.safetensors"))
    prompt = _fuse_prompt("srv_fused/out", "srv_fuse_src.safetensors")
    target = loras / "srv_fused" / "out.safetensors"

    server.run(prompt, timeout=120)
    assert target.is_file()
    target.unlink()
    entry = server.run(prompt, timeout=120)
    assert target.is_file(), "queued again after the file was deleted: Fuse did not run again"
    assert not any(m[0] == "execution_cached" and "2" in m[1].get("nodes", []) for m in entry["status"]["messages"])
    error = execution_error(server, prompt)
    assert error["exception_type"] == "texforce.LoraFileError"
    assert error["exception_message"].startswith("loras/srv_fused/out.safetensors already exists: choose another")
    entry = server.run(_fuse_prompt("srv_fused/out", "srv_fuse_src.safetensors", overwrite=True), timeout=120)
    assert target.is_file() and entry["status"]["status_str"] == "success"


@pytest.mark.parametrize("name, why", [("acc/new\nline", "contains a line break"), ("a\x00b", "contains a null character"),
                                       ("n" * 300, "is 300 characters long")])
def test_fuse_refuses_a_save_name_that_is_no_file_name(server, name, why):
    loras = server.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in as_kohya(random_lora(tiny_models.tiny_clip("sd1", 0), seed=4)).items()},
              str(loras / "srv_name_src.safetensors"))
    error = execution_error(server, _fuse_prompt(name, "srv_name_src.safetensors"))
    assert error["exception_type"] == "texforce.BadName" and why in error["exception_message"]
    assert str(server.base) not in error["exception_message"]
    assert not [p for p in loras.rglob("*") if p.name.startswith(("acc", "a\x00", "nnn"))]
