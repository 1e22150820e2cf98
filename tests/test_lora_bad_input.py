"""Bad LoRA input: each case is a clear error naming the file (or a stated assumption), never a silent no-op."""
from __future__ import annotations

import functools
import os

import pytest
import torch

from conftest import pack, tiny_models
from lora_builders import as_kohya, encode, hand_applied, random_lora, write_peft_folder
from test_lora_loading import assert_same, run_loader, write

LoraFileError = pack.training.lora.LoraFileError
Fuse = pack.nodes.lora_nodes.TexForceLoraFuse


def test_sdxl_lora_on_sd1_clip_is_refused(loras_dir):
    sdxl = tiny_models.tiny_clip("sdxl", 0)
    name = write(loras_dir / "sdxl_style.safetensors", as_kohya(random_lora(sdxl)))  # te1 + te2 keys
    with pytest.raises(LoraFileError, match=r"sdxl_style\.safetensors: this LoRA is for SDXL \(CLIP-L \+ CLIP-G\) "
                                            r"but the CLIP is SD 1\.x \(CLIP-L\)\. The file has te1 width 32, te2 width 48"):
        run_loader(tiny_models.tiny_clip("sd1", 0), lora_1=name)


def test_lora_of_other_width_is_refused_with_both_shapes(loras_dir):
    name = write(loras_dir / "sd1_style.safetensors", as_kohya(random_lora(tiny_models.tiny_clip("sd1", 0))))
    with pytest.raises(LoraFileError, match=r"sd1_style\.safetensors.*width 32.*clip_h \(width 40\)"):
        run_loader(tiny_models.tiny_clip("sd2", 0), lora_1=name)


def test_truncated_safetensors(loras_dir):
    write(loras_dir / "full.safetensors", as_kohya(random_lora(tiny_models.tiny_clip("sd1", 0))))
    data = (loras_dir / "full.safetensors").read_bytes()
    (loras_dir / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFileError, match=r"cut\.safetensors.*truncated or corrupt"):
        run_loader(tiny_models.tiny_clip("sd1", 0), lora_1="cut.safetensors")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(loras_dir, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"lora_te_x.lora_down.weight": torch.zeros(1), "payload": _RunsCode(marker)}, loras_dir / "evil.pt")
    with pytest.raises(LoraFileError, match=r"evil\.pt.*refused because loading it could run code"):
        run_loader(tiny_models.tiny_clip("sd1", 0), lora_1="evil.pt")
    assert not marker.exists()


def test_pickle_that_is_not_a_tensor_dict(loras_dir):
    torch.save([torch.zeros(2)], loras_dir / "list.pt")
    with pytest.raises(LoraFileError, match=r"list\.pt.*flat dict of named tensors"):
        run_loader(tiny_models.tiny_clip("sd1", 0), lora_1="list.pt")


def test_peft_bin_without_config_states_the_assumed_scale(loras_dir):
    make = functools.partial(tiny_models.tiny_clip, "sd1", 0)
    clip = make()
    mods = random_lora(clip, rank=4, alpha=4.0)  # alpha = r: what the assumption gives
    path = write_peft_folder(loras_dir / "noconf", mods, lora_alpha=4.0, r=4, config=False)
    out_clip, _, report = run_loader(clip, lora_1=path.relative_to(loras_dir).as_posix())
    assert "assumed lora_alpha = r (scale 1.0" in report
    assert_same(encode(out_clip), encode(hand_applied(make, [(mods, 1.0)])))


def test_nan_weights_are_refused(loras_dir):
    sd = as_kohya(random_lora(tiny_models.tiny_clip("sd1", 0)))
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key][0, 0] = float("nan")
    name = write(loras_dir / "nan.safetensors", sd)
    with pytest.raises(LoraFileError, match=r"nan\.safetensors.*NaN or Inf"):
        run_loader(tiny_models.tiny_clip("sd1", 0), lora_1=name)


def test_foreign_file_is_refused(loras_dir):
    name = write(loras_dir / "vae.safetensors", {"encoder.conv_in.weight": torch.zeros(4, 3), "decoder.x": torch.ones(2)})
    with pytest.raises(LoraFileError, match=r"vae\.safetensors.*no LoRA weights recognised"):
        run_loader(tiny_models.tiny_clip("sd1", 0), lora_1=name)


def test_unet_only_file_without_model_is_refused(loras_dir):
    name = write(loras_dir / "unet.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(2, 4),
                                                  "lora_unet_x.lora_up.weight": torch.zeros(4, 2)})
    with pytest.raises(LoraFileError, match=r"unet\.safetensors.*connect a MODEL"):
        run_loader(tiny_models.tiny_clip("sd1", 0), lora_1=name)


@pytest.mark.parametrize("bad", ["../escape", "/tmp/abs_name", "sub/../../escape", "..\\win", "C:evil"])
def test_fuse_save_name_cannot_leave_the_loras_folder(bad, loras_dir):
    clip = tiny_models.tiny_clip("sd1", 0)
    name = write(loras_dir / "k.safetensors", as_kohya(random_lora(clip)))
    with pytest.raises(LoraFileError, match="inside models/loras|outside models/loras"):
        Fuse.execute(clip=clip, save_name=bad, lora_1=name, weight_1=1.0)
    written = {p.name for p in loras_dir.parent.rglob("*.safetensors")}
    assert written == {"k.safetensors"}
