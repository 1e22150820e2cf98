"""SD 3.x and Flux text-encoder LoRAs (CLIP-L, CLIP-G, T5-XXL): every published layout loads to exactly the
hand-applied weights, files the pack writes load in ComfyUI's stock loader with identical conditioning, and files
of another family are refused naming both families. On ComfyUI's own SD3ClipModel / FluxClipModel (tiny sizes)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, pack, tiny_models
from lora_builders import (T5_ATTN, as_comfyui, as_diffusers, as_kohya, encode, hand_applied, random_lora,
                           write_peft_folder)
from test_family_mismatch import ours
from test_lora_loading import assert_same, run_loader, stock_lora_loader, write

LoraFileError = pack.training.lora.LoraFileError
Fuse = pack.nodes.lora_nodes.TexForceLoraFuse
TOL = 1e-5  # fp32 round-off of W + s·Δ against ComfyUI's patch arithmetic, on conditioning of size ~1
LABEL = {"sd1": r"SD 1\.x \(CLIP-L\)", "sdxl": r"SDXL \(CLIP-L \+ CLIP-G\)",
         "sd3": r"SD 3\.x \(CLIP-L \+ CLIP-G \+ T5-XXL\)", "flux": r"Flux \(CLIP-L \+ T5-XXL\)"}
ENCODERS = {"sd3": {"clip_l", "clip_g", "t5xxl"}, "flux": {"clip_l", "t5xxl"}}
STRENGTH = 0.8


class Clips:
    """One base CLIP per family and hand-applied references, each built once per module (an SD 3.x CLIP holds a
    4096-wide T5: 0.5 GB, seconds to build)."""

    def __init__(self):
        self._base: dict[str, object] = {}
        self._expected: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def base(self, family: str):
        if family not in self._base:
            self._base[family] = tiny_models.tiny_clip(family, 0)
        return self._base[family]

    def mods(self, family: str, encoders: tuple[str, ...] | None = None, seed: int = 1):
        """A random LoRA on attention and feed-forward layers of these encoders (all when None)."""
        return random_lora(self.base(family), rank=4, alpha=2.0, seed=seed, encoders=encoders, mlp=True)

    def expected(self, family: str, encoders: tuple[str, ...] | None = None, seed: int = 1):
        """Conditioning of a fresh CLIP with W += STRENGTH·(α/r)·up@down written into its weights by hand."""
        key = (family, encoders, seed)
        if key not in self._expected:
            mods = self.mods(family, encoders, seed)
            self._expected[key] = encode(hand_applied(lambda: tiny_models.tiny_clip(family, 0), [(mods, STRENGTH)]))
        return self._expected[key]


@pytest.fixture(scope="module")
def clips():
    return Clips()


def peft(encoder: str):
    """A PEFT folder adapting one encoder (PEFT adapts one model: CLIP-L's text_model... or T5's encoder.block...)."""
    targets = list(T5_ATTN) + ["wi_0", "wi_1", "wo"] if encoder == "t5xxl" else None
    return lambda d, m: write_peft_folder(d / f"peft_{encoder}", m, lora_alpha=2.0, r=4,
                                          target_modules=targets).relative_to(d).as_posix()


# (family, layout) -> (encoders the file holds (None: all), writer)
CASES = {
    ("sd3", "kohya te1/te2/te3 (sd-scripts)"): (None, lambda d, m: write(d / "k.safetensors", as_kohya(m))),
    ("sd3", "diffusers text_encoder/_2/_3"): (None, lambda d, m: write(
        d / "d.safetensors", as_diffusers(m, "lora_A", family="sd3"))),
    ("sd3", "diffusers lora_linear_layer"): (None, lambda d, m: write(
        d / "d1.safetensors", as_diffusers(m, "lora_linear_layer", family="sd3"))),
    ("sd3", "comfyui text_encoders.*"): (None, lambda d, m: write(d / "c.safetensors", as_comfyui(m))),
    ("sd3", "peft T5"): (("t5xxl",), peft("t5xxl")),
    ("sd3", "kohya te3 only"): (("t5xxl",), lambda d, m: write(d / "t5.safetensors", as_kohya(m))),
    ("flux", "kohya te1 + te3 (sd-scripts)"): (None, lambda d, m: write(d / "k.safetensors", as_kohya(m))),
    ("flux", "kohya te1 + te2 T5 (OneTrainer)"): (None, lambda d, m: write(
        d / "ot.safetensors", as_kohya(m, t5_slot="te2"))),
    ("flux", "diffusers text_encoder + text_encoder_2 T5"): (None, lambda d, m: write(
        d / "d.safetensors", as_diffusers(m, "lora_A", family="flux"))),
    ("flux", "comfyui text_encoders.*"): (None, lambda d, m: write(d / "c.safetensors", as_comfyui(m))),
    ("flux", "peft T5"): (("t5xxl",), peft("t5xxl")),
    ("flux", "peft CLIP-L"): (("clip_l",), peft("clip_l")),
    ("flux", "diffusers T5 only (text_encoder_2)"): (("t5xxl",), lambda d, m: write(
        d / "d2.safetensors", as_diffusers(m, "lora_A", family="flux"))),
}


@pytest.mark.parametrize("family,layout", list(CASES), ids=[f"{f}-{c}" for f, c in CASES])
def test_every_layout_equals_hand_applied_weights(family, layout, clips, loras_dir):
    encoders, make = CASES[(family, layout)]
    mods = clips.mods(family, encoders)
    name = make(loras_dir, mods)
    clip = clips.base(family)
    out_clip, _, report = run_loader(clip, lora_1=name, strength_1=STRENGTH)
    expected = clips.expected(family, encoders)
    assert_same(encode(out_clip), expected, tol=TOL)
    before = encode(clip)
    # not vacuous: T5 is the cross-attention conditioning of both families, CLIP-L the pooled output
    if encoders is None or "t5xxl" in encoders:
        assert (before[0] - expected[0]).abs().max() > 1e-2
    if encoders is None or "clip_l" in encoders:
        assert (before[1] - expected[1]).abs().max() > 1e-2
    for enc in {e for e, _ in mods}:
        assert f"{enc} {sum(1 for e, _ in mods if e == enc)} modules" in report
    assert "keys not matched: 0" in report


@pytest.mark.parametrize("family,t5_slot", [("sd3", "te3"), ("flux", "te3"), ("flux", "te2")])
def test_kohya_files_of_sd_scripts_and_onetrainer_equal_the_stock_loader(family, t5_slot, clips, loras_dir):
    """ComfyUI's own key map (te3 for T5 on SD 3.x; te2 and te3 on Flux) applies these files as we do."""
    clip = clips.base(family)
    name = write(loras_dir / "k.safetensors", as_kohya(clips.mods(family, seed=3), t5_slot=t5_slot))
    ours_clip = run_loader(clip, lora_1=name, strength_1=0.6)[0]
    _, stock = stock_lora_loader(clip, name, 0.6)
    assert_same(encode(ours_clip), encode(stock), tol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fused_file_equals_stacking_and_loads_in_stock_loader(family, clips, loras_dir):
    clip = clips.base(family)
    na = write(loras_dir / "a.safetensors", as_diffusers(clips.mods(family, seed=1), "lora_A", family=family))
    nb = write(loras_dir / "b.safetensors", as_kohya(random_lora(clip, seed=2, rank=8, alpha=8.0), t5_slot="te2"
                                                     if family == "flux" else "te3"))
    stacked = run_loader(clip, lora_1=na, strength_1=0.7, lora_2=nb, strength_2=-0.3)[0]
    fused_clip, path, _ = Fuse.execute(clip=clip, save_name="texforce/fused", lora_1=na, weight_1=0.7,
                                       lora_2=nb, weight_2=-0.3).result
    stacked_cond = encode(stacked)
    assert_same(encode(fused_clip), stacked_cond, tol=TOL)
    _, stock = stock_lora_loader(clip, "texforce/fused.safetensors", 1.0)
    assert_same(encode(stock), stacked_cond, tol=TOL)
    with safe_open(path, framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["texforce.family"] == family
    assert meta["ss_base_model_version"] == pack.training.lora.family.FAMILIES[family].kohya_version
    slots = {k.split("_")[1] for k in keys}
    assert slots == ({"te1", "te2", "te3"} if family == "sd3" else {"te1", "te3"})
    assert any(k.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q.") for k in keys)
    assert all(f"{k.rsplit('.', 2)[0]}.alpha" in keys for k in keys if k.endswith("lora_down.weight"))


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.lora.convert", *args], cwd=REPO, capture_output=True,
                          text=True)


@pytest.mark.parametrize("family,layout", [("sd3", "diffusers text_encoder/_2/_3"), ("sd3", "peft T5"),
                                           ("flux", "diffusers text_encoder + text_encoder_2 T5"),
                                           ("flux", "kohya te1 + te2 T5 (OneTrainer)"), ("flux", "peft T5")])
def test_converted_file_loads_like_the_original_in_ours_and_the_stock_loader(family, layout, clips, loras_dir):
    encoders, make = CASES[(family, layout)]
    src = make(loras_dir, clips.mods(family, encoders))
    out = loras_dir / "converted.safetensors"
    proc = convert_cli(str(loras_dir / src), str(out), "--family", family)
    assert proc.returncode == 0, proc.stderr
    clip = clips.base(family)
    original = encode(run_loader(clip, lora_1=src, strength_1=STRENGTH)[0])
    assert_same(encode(run_loader(clip, lora_1=out.name, strength_1=STRENGTH)[0]), original, tol=1e-6)
    _, stock = stock_lora_loader(clip, out.name, STRENGTH)
    assert_same(encode(stock), original, tol=TOL)
    with safe_open(str(out), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split("_")[1] for k in keys} == {{"clip_l": "te1", "clip_g": "te2", "t5xxl": "te3"}[e]
                                                for e in (encoders or ENCODERS[family])}
    assert meta["texforce.family"] == family


def test_converter_records_no_family_that_the_file_does_not_name(clips, loras_dir):
    """A CLIP-L + T5 file without metadata fits Flux and SD 3.x (SD 3.x LoRAs may leave CLIP-G out): the converter
    does not write a guess that would then refuse it on SD 3.x, and says how to record the family."""
    src = write(loras_dir / "d.safetensors", as_diffusers(clips.mods("flux"), "lora_A", family="flux"))
    out = loras_dir / "converted.safetensors"
    proc = convert_cli(str(loras_dir / src), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "--family" in proc.stderr and "Flux" in proc.stderr and "SD 3.x" in proc.stderr
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert "texforce.family" not in meta and "ss_base_model_version" not in meta


def sd3_file(clips, d):
    return write(d / "sd3.safetensors", as_kohya(clips.mods("sd3")))


def flux_file_with_metadata(clips, d):
    return ours(clips.base("flux"), "flux", d / "ours_flux.safetensors")


def flux_t5_file_with_metadata(clips, d):
    lora = pack.training.lora.LoraSet(source="x", format="kohya")
    for (_, path), (down, up, alpha) in clips.mods("flux", ("t5xxl",)).items():
        lora.modules[("te3", path)] = pack.training.lora.LoraModule(down=down, up=up, alpha=alpha)
    return pack.training.lora.save_kohya(lora, d / "flux_t5.safetensors", family="flux").name


@pytest.mark.parametrize("file_family,clip_family,make", [
    ("sd3", "flux", sd3_file),  # te1 + te2 + te3 is only SD 3.x's
    ("sd3", "sdxl", sd3_file),
    ("sd3", "sd1", sd3_file),
    ("flux", "sd3", flux_file_with_metadata),  # CLIP-L + T5 fits both: the metadata says Flux
    ("flux", "sd3", flux_t5_file_with_metadata),
    ("flux", "sdxl", lambda c, d: write(d / "flux.safetensors", as_kohya(c.mods("flux")))),  # te3
    ("flux", "sd1", lambda c, d: write(d / "flux_ot.safetensors", as_kohya(c.mods("flux"), t5_slot="te2"))),
    ("sd1", "flux", lambda c, d: ours(tiny_models.tiny_clip("sd1", 0), "sd1", d / "ours_sd1.safetensors")),
    ("sdxl", "flux", lambda c, d: write(d / "xl.safetensors", as_kohya(random_lora(tiny_models.tiny_clip("sdxl", 0))))),
    ("sdxl", "sd3", lambda c, d: ours(tiny_models.tiny_clip("sdxl", 0), "sdxl", d / "ours_xl.safetensors")),
])
def test_loader_and_fuse_refuse_a_lora_of_another_family_naming_both(file_family, clip_family, make, clips,
                                                                       loras_dir):
    name = make(clips, loras_dir)
    clip = clips.base(clip_family) if clip_family in ENCODERS else tiny_models.tiny_clip(clip_family, 0)
    pattern = rf"{name}: this LoRA is for {LABEL[file_family]} but the CLIP is {LABEL[clip_family]}"
    with pytest.raises(LoraFileError, match=pattern):
        run_loader(clip, lora_1=name)
    with pytest.raises(LoraFileError, match=pattern):
        Fuse.execute(clip=clip, save_name="fused", lora_1=name, weight_1=1.0)
    assert not (loras_dir / "fused.safetensors").exists()


def test_a_clip_l_and_t5_file_without_metadata_is_not_refused_on_sd3_but_checked_by_shape(clips, loras_dir):
    """Flux and SD 3.x share CLIP-L and T5-XXL: a te1 + te3 file that names no family is tried on SD 3.x, and the
    tiny Flux T5 (64 wide) does not fit the SD 3.x one (4096), which the message says."""
    name = write(loras_dir / "flux.safetensors", as_kohya(clips.mods("flux")))
    with pytest.raises(LoraFileError, match=r"flux\.safetensors: its text-encoder weights do not fit this CLIP .*"
                                            r"this CLIP is SD 3\.x .*t5xxl \(width 4096\)"):
        run_loader(clips.base("sd3"), lora_1=name)


def test_a_clip_only_sdxl_file_applies_to_sd3_like_the_stock_loader(clips, loras_dir):
    """SD 3.x has SDXL's CLIP-L and CLIP-G: a te1 + te2 file without metadata applies to both."""
    clip = clips.base("sd3")
    mods = {k: v for k, v in clips.mods("sd3").items() if k[0] != "t5xxl"}
    name = write(loras_dir / "clips.safetensors", as_kohya(mods))
    ours_clip, _, report = run_loader(clip, lora_1=name, strength_1=0.5)
    _, stock = stock_lora_loader(clip, name, 0.5)
    assert_same(encode(ours_clip), encode(stock), tol=1e-6)
    assert "t5xxl" not in report.split("text encoders:")[1] and "keys not matched: 0" in report


@pytest.mark.parametrize("unet_key", ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                                      "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
                                      "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"])
def test_a_flux_file_with_a_transformer_part_applies_its_text_encoders_and_reports_the_rest(unet_key, clips,
                                                                                          loras_dir):
    """sd-scripts (lora_unet_), diffusers (transformer.) and OneTrainer (lora_transformer_) name Flux's
    transformer: without a MODEL that part is reported as not applied, the text-encoder part is applied."""
    sd = as_kohya(clips.mods("flux", ("t5xxl",)))
    sd[unet_key] = torch.zeros(4, 64)
    name = write(loras_dir / "both.safetensors", sd)
    out_clip, _, report = run_loader(clips.base("flux"), lora_1=name, strength_1=STRENGTH)
    assert_same(encode(out_clip), clips.expected("flux", ("t5xxl",)), tol=TOL)
    assert "not applied: connect a MODEL" in report


@pytest.mark.parametrize("family,unet_key,width,out", [
    ("flux", "lora_unet_double_blocks_0_img_attn_qkv", 64, 192),            # sd-scripts: the fused qkv
    ("flux", "transformer.single_transformer_blocks.0.attn.to_q", 64, 64),  # diffusers: q, a slice of linear1
    ("sd3", "lora_unet_joint_blocks_0_x_block_attn_qkv", 128, 384),
    ("sd3", "transformer.transformer_blocks.0.attn.to_q", 128, 128)])
def test_a_transformer_part_goes_to_the_model_like_the_stock_loader(family, unet_key, width, out, clips, loras_dir):
    """With a MODEL (the tiny Flux / SD 3.x transformer in ComfyUI's classes) the transformer part of a file gives
    the weights ComfyUI's LoraLoader gives, whole or as a slice of a fused layer, and the text-encoder part the
    same conditioning."""
    import comfy.lora

    clip = clips.base(family)
    with torch.inference_mode():
        model = tiny_models.tiny_transformer(family, 0)
    g = torch.Generator().manual_seed(7)
    sd = as_kohya(clips.mods(family, ("t5xxl",)))
    if unet_key.startswith("transformer."):
        sd[f"{unet_key}.lora_A.weight"] = torch.randn(4, width, generator=g)
        sd[f"{unet_key}.lora_B.weight"] = torch.randn(out, 4, generator=g)
    else:
        sd[f"{unet_key}.lora_down.weight"] = torch.randn(4, width, generator=g)
        sd[f"{unet_key}.lora_up.weight"] = torch.randn(out, 4, generator=g)
        sd[f"{unet_key}.alpha"] = torch.tensor(2.0)
    name = write(loras_dir / "both.safetensors", sd)
    ours_clip, ours_model, report = run_loader(clip, model, lora_1=name, strength_1=STRENGTH)
    stock_model, stock_clip = stock_lora_loader(clip, name, STRENGTH, model=model)
    assert "keys not matched: 0" in report and "U-Net: 1 modules" in report, report
    assert set(ours_model.patches) == set(stock_model.patches) and len(ours_model.patches) == 1
    key = next(iter(stock_model.patches))
    base = model.model.state_dict()[key].float()
    ours = comfy.lora.calculate_weight(ours_model.patches[key], base.clone(), key)
    theirs = comfy.lora.calculate_weight(stock_model.patches[key], base.clone(), key)
    assert torch.equal(ours, theirs) and (ours - base).abs().max() > 1e-3
    assert int(((ours - base).abs().amax(dim=1) > 0).sum()) == out  # a diffusers q: only its rows of the fused layer
    assert_same(encode(ours_clip), encode(stock_clip), tol=1e-6)
    assert not model.patches  # the MODEL passed in is left as it was


def test_keys_the_loader_does_not_know_are_reported_without_a_model(clips, loras_dir):
    """A key of no text-encoder layer the pack knows is counted in the report instead of saying every key matched."""
    sd = as_kohya(clips.mods("flux", ("t5xxl",)))
    sd["lora_te1_text_model_final_layer_norm.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_te1_text_model_final_layer_norm.lora_up.weight"] = torch.zeros(32, 4)
    name = write(loras_dir / "unknown.safetensors", sd)
    out_clip, _, report = run_loader(clips.base("flux"), lora_1=name, strength_1=STRENGTH)
    assert "keys not matched: 2 (e.g. lora_te1_text_model_final_layer_norm." in report
    assert_same(encode(out_clip), clips.expected("flux", ("t5xxl",)), tol=TOL)


def test_onetrainers_text_projection_keys_apply_as_in_the_stock_loader(clips, loras_dir):
    """OneTrainer's SD 3.x files may train the CLIPs' pooled-output projections (lora_te1_/lora_te2_text_projection),
    which ComfyUI's stock loader applies: so does the pack, and CLIP-G's moves SD 3.x's pooled output."""
    g = torch.Generator().manual_seed(5)
    sd = as_kohya(clips.mods("sd3", ("t5xxl",)))
    for slot, width in (("te1", tiny_models.WIDTHS["clip_l"][0]), ("te2", tiny_models.WIDTHS["clip_g"][0])):
        sd[f"lora_{slot}_text_projection.lora_down.weight"] = torch.randn(4, width, generator=g) * 0.3
        sd[f"lora_{slot}_text_projection.lora_up.weight"] = torch.randn(width, 4, generator=g) * 0.3
        sd[f"lora_{slot}_text_projection.alpha"] = torch.tensor(2.0)
    name = write(loras_dir / "proj.safetensors", sd)
    clip = clips.base("sd3")
    out_clip, _, report = run_loader(clip, lora_1=name, strength_1=STRENGTH)
    assert "keys not matched: 0" in report
    _, stock = stock_lora_loader(clip, name, STRENGTH)
    ours_cond, stock_cond = encode(out_clip), encode(stock)
    assert_same(ours_cond, stock_cond, tol=1e-6)
    assert (ours_cond[1] - clips.expected("sd3", ("t5xxl",))[1]).abs().max() > 1e-2


def test_converter_refuses_a_family_the_file_does_not_fit(clips, loras_dir):
    src = write(loras_dir / "sd3.safetensors", as_kohya(clips.mods("sd3")))
    out = loras_dir / "converted.safetensors"
    proc = convert_cli(str(loras_dir / src), str(out), "--family", "flux")
    assert proc.returncode == 2 and not out.exists()
    assert "--family flux does not fit this LoRA, which is for SD 3.x (CLIP-L + CLIP-G + T5-XXL)" in proc.stderr
    assert "pass --family sd3" in proc.stderr


def test_a_transformer_only_flux_file_without_a_model_asks_for_one(clips, loras_dir):
    name = write(loras_dir / "dit.safetensors", {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight":
                                                 torch.zeros(4, 64),
                                                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight":
                                                 torch.zeros(64, 4)})
    with pytest.raises(LoraFileError, match=r"dit\.safetensors: holds only U-Net \(or Flux / SD 3\.x transformer\) "
                                            r"weights; connect a MODEL"):
        run_loader(clips.base("flux"), lora_1=name)


def test_a_t5_file_on_a_clip_without_t5_says_which_families_it_is_for(clips, loras_dir):
    """A T5-only file (released width 4096) names neither SD 3.x nor Flux; on an SDXL CLIP the message says both."""
    name = write(loras_dir / "t5.safetensors", as_kohya(clips.mods("sd3", ("t5xxl",))))
    with pytest.raises(LoraFileError, match=r"t5\.safetensors: has weights for text encoder slot\(s\) te3, which this "
                                            r"CLIP \(SDXL .*\) does not have\. The LoRA is for SD 3\.x or Flux: te3 "
                                            r"width 4096; load it with a checkpoint of that family"):
        run_loader(tiny_models.tiny_clip("sdxl", 0), lora_1=name)
