"""Loading and stacking text-encoder LoRAs: every layout against hand-applied weights and ComfyUI's stock loader."""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

from conftest import pack, tiny_models
from lora_builders import (as_comfyui, as_diffusers, as_kohya, encode, hand_applied, random_lora,
                           write_peft_folder)

nodes_mod = pack.nodes.lora_nodes
Loader = nodes_mod.TexForceLoraLoader
TOL = 1e-5


def run_loader(clip, model=None, **rows):
    out = Loader.execute(clip=clip, model=model, **rows)
    return out.result if hasattr(out, "result") else out


def stock_lora_loader(clip, name, strength, model=None):
    import nodes as comfy_nodes  # ComfyUI's own top-level nodes module

    return comfy_nodes.LoraLoader().load_lora(model, clip, name, strength if model is not None else 0.0, strength)


def assert_same(a, b, tol=TOL):
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=tol, rtol=0), f"max diff {(x - y).abs().max().item():.3g}"


def write(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path.name


SD1_CASES = {
    "kohya": lambda d, m: write(d / "k.safetensors", as_kohya(m)),
    "diffusers-lora_linear_layer": lambda d, m: write(d / "d1.safetensors", as_diffusers(m, "lora_linear_layer")),
    "diffusers-lora_A": lambda d, m: write(d / "d2.safetensors", as_diffusers(m, "lora_A")),
    "diffusers-lora.down": lambda d, m: write(d / "d3.safetensors", as_diffusers(m, "lora.down")),
    "comfyui": lambda d, m: write(d / "c.safetensors", as_comfyui(m)),
    "peft-bin": lambda d, m: write_peft_folder(d / "tf_bin", m, lora_alpha=2.0, r=4).relative_to(d).as_posix(),
    "peft-safetensors": lambda d, m: write_peft_folder(
        d / "tf_st", m, lora_alpha=2.0, r=4, weights="adapter_model.safetensors").relative_to(d).as_posix(),
}


@pytest.mark.parametrize("family,case", [("sd1", c) for c in SD1_CASES]
                         + [("sdxl", c) for c in ("kohya", "diffusers-lora_A", "comfyui")]
                         + [("sd2", c) for c in ("kohya", "peft-bin", "diffusers-lora_linear_layer")])
def test_every_format_equals_hand_applied_weights(family, case, loras_dir):
    make = functools.partial(tiny_models.tiny_clip, family, 0)
    clip = make()
    mods = random_lora(clip, rank=4, alpha=2.0)
    name = SD1_CASES[case](loras_dir, mods)
    out_clip, _, report = run_loader(clip, lora_1=name, strength_1=0.8)
    expected = encode(hand_applied(make, [(mods, 0.8)]))
    assert_same(encode(out_clip), expected)
    assert not torch.allclose(encode(clip)[0], expected[0], atol=1e-3), "the LoRA must visibly change the conditioning"
    n_encoders = 2 if family == "sdxl" else 1
    assert report.count(" modules") >= n_encoders and "keys not matched: 0" in report
    for enc in {e for e, _ in mods}:
        assert f"{enc} {sum(1 for e, _ in mods if e == enc)} modules" in report


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_ours_equals_comfyui_stock_loader(family, loras_dir):
    clip = tiny_models.tiny_clip(family, 0)
    name = write(loras_dir / "k.safetensors", as_kohya(random_lora(clip, seed=3)))
    ours = run_loader(clip, lora_1=name, strength_1=0.6)[0]
    _, stock = stock_lora_loader(clip, name, 0.6)
    assert_same(encode(ours), encode(stock), tol=1e-6)


def test_two_rows_stack_and_toggle(loras_dir):
    make = functools.partial(tiny_models.tiny_clip, "sd1", 0)
    clip = make()
    a, b, c = (random_lora(clip, seed=s, rank=r, alpha=al) for s, r, al in ((1, 4, 4.0), (2, 8, 2.0), (3, 2, 1.0)))
    na = write(loras_dir / "a.safetensors", as_kohya(a))
    nb = write_peft_folder(loras_dir / "b", b, lora_alpha=2.0, r=8).relative_to(loras_dir).as_posix()
    nc = write(loras_dir / "c.safetensors", as_kohya(c))
    out = run_loader(clip, lora_1=na, strength_1=0.7, lora_2=nb, strength_2=-0.4, lora_3=nc, strength_3=1.0, on_3=False)
    assert_same(encode(out[0]), encode(hand_applied(make, [(a, 0.7), (b, -0.4)])))
    assert "[3]" not in out[2]


def test_loading_leaves_inputs_untouched(loras_dir):
    clip, model = tiny_models.tiny_clip("sd1", 0), tiny_models.tiny_model(0)
    before = encode(clip)
    sd = as_kohya(random_lora(clip))
    name = write(loras_dir / "k.safetensors", sd)
    out_clip, out_model, _ = run_loader(clip, model, lora_1=name, strength_1=1.0)
    assert out_clip is not clip and out_model is not model
    assert not clip.patcher.patches and not model.patches
    assert_same(encode(clip), before, tol=0.0)


def test_unet_part_goes_to_model_like_stock_loader(loras_dir):
    clip, model = tiny_models.tiny_clip("sd1", 0), tiny_models.tiny_model(0)
    sd = as_kohya(random_lora(clip))
    g = torch.Generator().manual_seed(5)
    proj = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd[f"{proj}.lora_down.weight"] = torch.randn(4, 32, generator=g)
    sd[f"{proj}.lora_up.weight"] = torch.randn(32, 4, generator=g)
    sd[f"{proj}.alpha"] = torch.tensor(4.0)
    name = write(loras_dir / "both.safetensors", sd)
    _, out_model, report = run_loader(clip, model, lora_1=name, strength_1=0.5)
    stock_model, _ = stock_lora_loader(clip, name, 0.5, model=model)
    assert set(out_model.patches) == set(stock_model.patches) and len(out_model.patches) == 1
    assert "U-Net: 1 modules" in report and "keys not matched: 0" in report
    # Without a MODEL the U-Net part is reported as not applied, not silently dropped.
    _, none_model, report2 = run_loader(clip, None, lora_1=name, strength_1=0.5)
    assert none_model is None and "not applied: connect a MODEL" in report2
