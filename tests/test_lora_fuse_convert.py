"""Fusing and converting: files we write load in ComfyUI's stock loader with the conditioning our loader gives."""
from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors import safe_open

from conftest import REPO, pack, tiny_models
from lora_builders import as_kohya, encode, random_lora, write_peft_folder
from test_lora_loading import assert_same, run_loader, stock_lora_loader, write

Fuse = pack.nodes.lora_nodes.TexForceLoraFuse
LoraFileError = pack.training.lora.LoraFileError


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fused_file_equals_stacking_and_loads_in_stock_loader(family, loras_dir):
    clip = tiny_models.tiny_clip(family, 0)
    na = write(loras_dir / "a.safetensors", as_kohya(random_lora(clip, seed=1, rank=4, alpha=2.0)))
    nb = write(loras_dir / "b.safetensors", as_kohya(random_lora(clip, seed=2, rank=8, alpha=8.0)))
    stacked = run_loader(clip, lora_1=na, strength_1=0.7, lora_2=nb, strength_2=-0.3)[0]
    out = Fuse.execute(clip=clip, save_name="texforce/fused", lora_1=na, weight_1=0.7, lora_2=nb, weight_2=-0.3).result
    fused_clip, path, report = out
    assert path == str(loras_dir / "texforce" / "fused.safetensors")
    assert_same(encode(fused_clip), encode(stacked))
    _, stock = stock_lora_loader(clip, "texforce/fused.safetensors", 1.0)
    assert_same(encode(stock), encode(stacked))
    with safe_open(path, framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "12" and meta["ss_base_model_version"] == ("sdxl_base_v1-0" if family == "sdxl" else "sd_v1")
    prefixes = {k.split("_text_model")[0] for k in keys}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    assert all(f"{k.rsplit('.', 2)[0]}.alpha" in keys for k in keys if k.endswith("lora_down.weight"))
    # A second run with the same name must not overwrite silently.
    with pytest.raises(LoraFileError, match="already exists"):
        Fuse.execute(clip=clip, save_name="texforce/fused", lora_1=na, weight_1=1.0)


def test_peft_release_and_its_kohya_conversion_give_the_same_conditioning(loras_dir):
    clip = tiny_models.tiny_clip("sd1", 0)
    folder = write_peft_folder(loras_dir / "texforce_sd15", random_lora(clip, rank=4), lora_alpha=16, r=4).parent
    out = loras_dir / "texforce_sd15_kohya.safetensors"
    proc = subprocess.run([sys.executable, "-m", "training.lora.convert", str(folder), str(out), "--family", "sd1"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr
    peft_cond = encode(run_loader(clip, lora_1="texforce_sd15/adapter_model.bin")[0])
    assert_same(encode(run_loader(clip, lora_1=out.name)[0]), peft_cond)
    _, stock = stock_lora_loader(clip, out.name, 1.0)
    assert_same(encode(stock), peft_cond)
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").item() == 16.0
        assert f.metadata()["ss_network_alpha"] == "16.0"


def test_converter_reports_bad_input_and_exits_nonzero(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    proc = subprocess.run([sys.executable, "-m", "training.lora.convert", str(tmp_path / "junk.safetensors")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "junk.safetensors" in proc.stderr and "truncated or corrupt" in proc.stderr
