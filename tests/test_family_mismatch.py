"""A LoRA, checkpoint or CLIP of one family used with another is refused with a message naming both families
(ComfyUI's stock loader applies whatever keys happen to match and warns about the rest)."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import pack, tiny_models
from lora_builders import as_comfyui, as_kohya, random_lora
from test_family_training import PROMPTS, brightness, build, loop, small_config
from test_lora_loading import run_loader, write

LoraFileError = pack.training.lora.LoraFileError
Fuse = pack.nodes.lora_nodes.TexForceLoraFuse
ComfyHost = importlib.import_module(f"{pack.__name__}.training.hosts.comfy").ComfyHost
run_module = importlib.import_module(f"{pack.__name__}.training.run")
checkpoint = importlib.import_module(f"{pack.__name__}.training.checkpoint")
CheckpointError = checkpoint.CheckpointError
LABEL = {"sd1": r"SD 1\.x \(CLIP-L\)", "sd2": r"SD 2\.x \(OpenCLIP-H\)", "sdxl": r"SDXL \(CLIP-L \+ CLIP-G\)"}


def released_width_lora(width: int, layers: int = 2, rank: int = 2, seed: int = 0):
    """{(encoder, path): (down, up, alpha)} with the widths of a released encoder (768 CLIP-L, 1024 OpenCLIP-H)."""
    g = torch.Generator().manual_seed(seed)
    enc = {768: "clip_l", 1024: "clip_h"}[width]
    return {(enc, f"text_model.encoder.layers.{i}.self_attn.{p}_proj"):
            (torch.randn(rank, width, generator=g), torch.randn(width, rank, generator=g), float(rank))
            for i in range(layers) for p in ("q", "k", "v", "out")}


def ours(clip, family: str, path):
    """A file as TexForce writes it (kohya keys + texforce.family metadata) for a tiny CLIP of `family`."""
    lora = pack.training.lora.LoraSet(source="x", format="kohya")
    encs = {e for e, _ in random_lora(clip)}
    for (enc, p), (d, u, a) in random_lora(clip).items():
        slot = pack.training.lora.family.slot_for_encoder(enc, sorted(encs))
        lora.modules[(slot, p)] = pack.training.lora.LoraModule(down=d, up=u, alpha=a)
    return pack.training.lora.save_kohya(lora, path, family=family).name


@pytest.mark.parametrize("file_family,clip_family,make", [
    ("sdxl", "sd1", lambda d: write(d / "xl.safetensors", as_kohya(random_lora(tiny_models.tiny_clip("sdxl", 0))))),
    ("sdxl", "sd2", lambda d: write(d / "xl.safetensors", as_kohya(random_lora(tiny_models.tiny_clip("sdxl", 0))))),
    # by the widths of the released encoders, without metadata
    ("sd1", "sd2", lambda d: write(d / "sd15.safetensors", as_kohya(released_width_lora(768)))),
    ("sd1", "sdxl", lambda d: write(d / "sd15.safetensors", as_kohya(released_width_lora(768)))),
    ("sd2", "sd1", lambda d: write(d / "sd21.safetensors", as_kohya(released_width_lora(1024)))),
    ("sd2", "sdxl", lambda d: write(d / "sd21.safetensors", as_comfyui(random_lora(tiny_models.tiny_clip("sd2", 0))))),
    # by the metadata TexForce writes
    ("sd1", "sd2", lambda d: ours(tiny_models.tiny_clip("sd1", 0), "sd1", d / "ours_sd1.safetensors")),
    ("sd2", "sdxl", lambda d: ours(tiny_models.tiny_clip("sd2", 0), "sd2", d / "ours_sd2.safetensors")),
    ("sdxl", "sd1", lambda d: ours(tiny_models.tiny_clip("sdxl", 0), "sdxl", d / "ours_xl.safetensors")),
])
def test_loader_refuses_a_lora_of_another_family_naming_both(file_family, clip_family, make, loras_dir):
    name = make(loras_dir)
    pattern = rf"{name}: this LoRA is for {LABEL[file_family]} but the CLIP is {LABEL[clip_family]}"
    with pytest.raises(LoraFileError, match=pattern):
        run_loader(tiny_models.tiny_clip(clip_family, 0), lora_1=name)


def test_a_file_that_names_no_family_and_does_not_fit_says_what_it_is_for(loras_dir):
    name = write(loras_dir / "w32.safetensors", as_kohya(random_lora(tiny_models.tiny_clip("sd1", 0))))
    with pytest.raises(LoraFileError, match=r"w32\.safetensors: its text-encoder weights do not fit.*for a text "
                                            r"encoder of another size \(te width 32\); this CLIP is "
                                            r"SD 2\.x \(OpenCLIP-H\): clip_h \(width 40\)"):
        run_loader(tiny_models.tiny_clip("sd2", 0), lora_1=name)


def test_fuse_refuses_a_lora_of_another_family_and_writes_nothing(loras_dir):
    clip = tiny_models.tiny_clip("sd1", 0)
    good = write(loras_dir / "good.safetensors", as_kohya(random_lora(clip)))
    bad = write(loras_dir / "xl.safetensors", as_kohya(random_lora(tiny_models.tiny_clip("sdxl", 0))))
    with pytest.raises(LoraFileError, match=rf"xl\.safetensors: this LoRA is for {LABEL['sdxl']} but the CLIP "
                                            rf"is {LABEL['sd1']}"):
        Fuse.execute(clip=clip, save_name="fused", lora_1=good, weight_1=1.0, lora_2=bad, weight_2=0.5)
    assert not (loras_dir / "fused.safetensors").exists()


@pytest.mark.parametrize("trained,resumed,pattern", [
    (("sdxl", None), ("sd1", None), rf"it trained the CLIP-G \+ CLIP-L of {LABEL['sdxl']}, but this run trains the "
                                    rf"CLIP-L of {LABEL['sd1']}"),
    (("sd1", None), ("sdxl", None), rf"it trained the CLIP-L of {LABEL['sd1']}, but this run trains the "
                                    rf"CLIP-G \+ CLIP-L of {LABEL['sdxl']}"),
    (("sd2", None), ("sd1", None), rf"it trained the OpenCLIP-H of {LABEL['sd2']}, but this run trains the "
                                   rf"CLIP-L of {LABEL['sd1']}"),
    (("sdxl", ["clip_g"]), ("sdxl", None), rf"it trained the CLIP-G of {LABEL['sdxl']}, but this run trains the "
                                           rf"CLIP-G \+ CLIP-L of {LABEL['sdxl']}"),
])
def test_trainer_refuses_to_resume_a_checkpoint_of_another_family_or_encoder_choice(trained, resumed, pattern,
                                                                                   tmp_path):
    """The checkpoint records the family and the trained encoders; the refusal names both sides."""
    ckpt = tmp_path / "run.pt"
    cfg = small_config(epochs=2, num_steps=2)
    host, *_ = build(*trained, learnable=False)
    loop.Trainer(host, brightness, PROMPTS, cfg, checkpoint_path=ckpt).run(1)
    other, *_ = build(*resumed, learnable=False)
    with pytest.raises(CheckpointError, match=pattern):
        loop.Trainer(other, brightness, PROMPTS, cfg, checkpoint_path=ckpt)


@pytest.mark.parametrize("trained,resumed,pattern", [
    (("sdxl", None), ("sd1", None), rf"its LoRA is for {LABEL['sdxl']}: te1 width 32, te2 width 48, but this run "
                                    rf"trains {LABEL['sd1']}: te width 32"),
    (("sd2", None), ("sd1", None), rf"te width 40\), but this run trains {LABEL['sd1']}: te width 32"),
    (("sdxl", ["clip_g"]), ("sdxl", None), rf"its LoRA is for {LABEL['sdxl']}: te2 width 48, but this run trains "
                                           rf"{LABEL['sdxl']}: te1 width 32, te2 width 48 \(12 module\(s\) missing"),
])
def test_trainer_checks_the_lora_layout_of_a_checkpoint_without_model_record(trained, resumed, pattern, tmp_path):
    """A checkpoint that does not record its model (written before it did) is still refused by its LoRA's layout."""
    ckpt = tmp_path / "run.pt"
    cfg = small_config(epochs=2, num_steps=2)
    host, *_ = build(*trained, learnable=False)
    loop.Trainer(host, brightness, PROMPTS, cfg, checkpoint_path=ckpt).run(1)
    state = checkpoint.load_checkpoint(ckpt)
    del state["model"]
    checkpoint.save_checkpoint(ckpt, state)
    other, *_ = build(*resumed, learnable=False)
    with pytest.raises(LoraFileError, match=pattern):
        loop.Trainer(other, brightness, PROMPTS, cfg, checkpoint_path=ckpt)


def test_a_run_refuses_to_resume_a_run_of_another_family_or_encoder_choice(loras_dir):
    clip = tiny_models.tiny_clip("sdxl", 0)
    path = loras_dir / "run.safetensors"
    lora = pack.training.lora.LoraSet(source="run", format="kohya")
    for (enc, p), (d, u, a) in random_lora(clip, encoders={"clip_g"}).items():
        lora.modules[("te2", p)] = pack.training.lora.LoraModule(down=d, up=u, alpha=a)
    pack.training.lora.save_kohya(lora, path, family="sdxl", metadata={"encoders": "clip_g"})
    with pytest.raises(LoraFileError, match=rf"run 'run' was trained on {LABEL['sdxl']} \(run\.safetensors\), but "
                                            rf"this CLIP is {LABEL['sd1']}"):
        run_module.check_resume_layout(path, "run", "sd1", ["clip_l"])
    with pytest.raises(LoraFileError, match=r"run 'run' trained CLIP-G \(run\.safetensors\); this setting trains "
                                            r"CLIP-G \+ CLIP-L"):
        run_module.check_resume_layout(path, "run", "sdxl", ["clip_l", "clip_g"])
    run_module.check_resume_layout(path, "run", "sdxl", ["clip_g"])  # the same layout resumes
    run_module.check_resume_layout(loras_dir / "new.safetensors", "new", "sd1", ["clip_l"])  # a new run


@pytest.mark.parametrize("model_family,clip_family,pattern", [
    ("sd1", "sdxl", rf"the CLIP \({LABEL['sdxl']}\) gives 80-wide conditioning, but the MODEL \(SD 1\.x\) expects "
                    r"32-wide"),
    ("sdxl", "sd2", rf"the CLIP \({LABEL['sd2']}\) gives 40-wide conditioning, but the MODEL \(SDXL\) expects 80-wide"),
])
def test_a_clip_and_model_of_different_families_are_refused_before_sampling(model_family, clip_family, pattern):
    with torch.inference_mode():
        model, clip, vae = tiny_models.tiny_unet(model_family), tiny_models.tiny_clip(clip_family), tiny_models.tiny_vae()
        host = ComfyHost(model, clip, vae, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match=pattern):
        loop.Trainer(host, brightness, PROMPTS, small_config(epochs=1)).run(1)
