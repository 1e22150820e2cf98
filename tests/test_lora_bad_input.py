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
    with pytest.raises(LoraFileError, match=r"evil\.pt: refused, because loading this pickle can run code: it would "
                                            r"call (posix|nt)\.system while loading") as e:
        run_loader(tiny_models.tiny_clip("sd1", 0), lora_1="evil.pt")
    assert not marker.exists()
    assert "weights_only" not in str(e.value) and str(loras_dir) not in str(e.value)  # never the unsafe advice


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


@pytest.mark.parametrize("bad, why", [
    ("../escape", r"'\.\.' part.*cannot leave models/loras"), ("/tmp/abs_name", "absolute path: give a name inside models/loras"),
    ("sub/../../escape", r"'\.\.' part"), ("..\\win", r"'\.\.' part"), ("C:evil", "':' also names a drive")])
def test_fuse_save_name_cannot_leave_the_loras_folder(bad, why, loras_dir):
    clip = tiny_models.tiny_clip("sd1", 0)
    name = write(loras_dir / "k.safetensors", as_kohya(random_lora(clip)))
    with pytest.raises(LoraFileError, match=why):
        Fuse.execute(clip=clip, save_name=bad, lora_1=name, weight_1=1.0)
    written = {p.name for p in loras_dir.parent.rglob("*.safetensors")}
    assert written == {"k.safetensors"}


@pytest.mark.parametrize("bad, why", [
    ("acc/new\nline", r"contains a line break, which cannot be part of a file name"),
    ("a\x00b", r"contains a null character"),
    ("x" * 300, r"is 300 characters long; at most 255 are allowed"),
    ("y" * 250, r"has a part of 250 bytes \(yyyy.*file systems allow 243 with the '\.safetensors' added"),
    ("a\u202eb", r"U\+202E \(right-to-left override\)"),
    ("", r"save name is empty"),
    ("sub/", r"empty, '\.' or '\.\.' part")])
def test_fuse_refuses_names_that_are_no_file_name_saying_why(bad, why, loras_dir):
    clip = tiny_models.tiny_clip("sd1", 0)
    name = write(loras_dir / "k.safetensors", as_kohya(random_lora(clip)))
    with pytest.raises(LoraFileError, match=why) as e:
        Fuse.execute(clip=clip, save_name=bad, lora_1=name, weight_1=1.0)
    assert str(loras_dir) not in str(e.value) and "\n" not in str(e.value)  # one line, no server path
    assert {p.name for p in loras_dir.rglob("*") if p.is_file()} == {"k.safetensors"}


def test_the_longest_names_are_written(loras_dir):
    clip = tiny_models.tiny_clip("sd1", 0)
    name = write(loras_dir / "k.safetensors", as_kohya(random_lora(clip)))
    for save_name in ("x" * 243, "é" * 121, "sub/" + "z" * 243):
        path = Fuse.execute(clip=clip, save_name=save_name, lora_1=name, weight_1=1.0).result[1]
        assert os.path.isfile(path) and len(os.path.basename(path).encode()) <= 255


@pytest.mark.parametrize("content, why", [
    (b"", r"empty\.bin: the file is empty \(0 bytes\)"),
    (b"hello world" * 10, r"junk\.bin: cannot be read as a torch file \(\w+Error: .+\); it is probably truncated")])
def test_unreadable_pickles_say_what_is_wrong(content, why, loras_dir):
    (loras_dir / ("empty.bin" if not content else "junk.bin")).write_bytes(content)
    with pytest.raises(LoraFileError, match=why) as e:
        run_loader(tiny_models.tiny_clip("sd1", 0), lora_1="empty.bin" if not content else "junk.bin")
    assert "()" not in str(e.value)


def test_errors_name_files_as_listed_never_by_the_server_path(loras_dir):
    sub = loras_dir / "sub"
    sub.mkdir()
    (sub / "cut.safetensors").write_bytes(b"\x01" * 64)
    (sub / "empty.safetensors").write_bytes(b"")
    clip = tiny_models.tiny_clip("sd1", 0)
    peft = write_peft_folder(loras_dir / "nan_peft", random_lora(clip, rank=4), lora_alpha=4, r=4)
    tensors = torch.load(peft, weights_only=True)
    next(iter(tensors.values()))[0, 0] = float("nan")
    torch.save(tensors, peft)
    (loras_dir / "bad_config").mkdir()
    torch.save({}, loras_dir / "bad_config" / "adapter_model.bin")
    (loras_dir / "bad_config" / "adapter_config.json").write_text("{not json")
    for listed, why in (("sub/cut.safetensors", r"sub/cut\.safetensors: not a readable safetensors file"),
                        ("sub/empty.safetensors", r"sub/empty\.safetensors: the file is empty"),
                        ("nan_peft/adapter_model.bin", r"nan_peft/adapter_model\.bin: 1 tensor\(s\) hold NaN"),
                        ("bad_config/adapter_model.bin", r"bad_config/adapter_config\.json: not valid JSON")):
        with pytest.raises(LoraFileError, match=why) as e:
            run_loader(clip, lora_1=listed)
        assert str(loras_dir) not in str(e.value), str(e.value)
    write(loras_dir / "k.safetensors", as_kohya(random_lora(clip)))
    Fuse.execute(clip=clip, save_name="out", lora_1="k.safetensors", weight_1=1.0)
    with pytest.raises(LoraFileError, match=r"^loras/out\.safetensors already exists: choose another save_name"):
        Fuse.execute(clip=clip, save_name="out", lora_1="k.safetensors", weight_1=1.0)


def test_fuse_fingerprint_changes_with_the_output_file(loras_dir):
    """ComfyUI re-executes a node only when its fingerprint changed: after the fused file is deleted, or while it
    exists (overwrite off: refused again rather than answered from the cache)."""
    clip = tiny_models.tiny_clip("sd1", 0)
    write(loras_dir / "k.safetensors", as_kohya(random_lora(clip)))
    inputs = dict(save_name="fp/out", overwrite=False, lora_1="k.safetensors", weight_1=1.0)
    before = Fuse.fingerprint_inputs(**inputs)
    assert Fuse.fingerprint_inputs(**inputs) == before  # stable while nothing changes
    path = Fuse.execute(clip=clip, **inputs).result[1]
    written = Fuse.fingerprint_inputs(**inputs)
    assert written != before
    os.remove(path)
    deleted = Fuse.fingerprint_inputs(**inputs)
    assert deleted not in (before, written)  # the same file state as before the first run, but written since
    write(loras_dir / "k.safetensors", as_kohya(random_lora(clip, seed=5)))  # an input file replaced
    assert Fuse.fingerprint_inputs(**inputs) != deleted
    assert Fuse.fingerprint_inputs(**{**inputs, "save_name": "a\nb"}) == ("bad save_name", "a\nb")
    Loader = pack.nodes.lora_nodes.TexForceLoraLoader
    loader_fp = Loader.fingerprint_inputs(lora_1="k.safetensors", strength_1=1.0)
    assert Loader.fingerprint_inputs(lora_1="k.safetensors", strength_1=1.0) == loader_fp
    write(loras_dir / "k.safetensors", as_kohya(random_lora(clip, seed=6)))
    os.utime(loras_dir / "k.safetensors", ns=(1, 1))
    assert Loader.fingerprint_inputs(lora_1="k.safetensors", strength_1=1.0) != loader_fp
