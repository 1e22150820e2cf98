"""example_workflows/*.json: valid UI workflows for the node definitions the server has, and they run.

Each template is converted to API format with the live server's /object_info (tests/workflow_api.py),
its checkpoint replaced by the tiny test checkpoint, its LoRA names pointed at files written here in the
real layouts, shrunk to 64×64 / 2 steps, and run through /prompt. The converter itself is tested on a
hand-written workflow and on ComfyUI's own default template (saved by the real frontend).
"""
from __future__ import annotations

import importlib.util
import json
import re
import uuid
from pathlib import Path

import pytest
import torch
from comfy_server import ComfyError
from conftest import tiny_models
from lora_builders import as_kohya, random_lora, write_peft_folder
from reward_builders import AESTHETIC_HEAD_FILE, reward_models_folder
from safetensors.torch import save_file
from workflow_api import (UnknownNodeType, check_ui_workflow, is_control_value, missing_node_types, node_types,
                          nodes_of, set_inputs, substitute, to_api, widget_values)

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
TINY = {"class_type": "TexForceTestTinyCheckpoint", "inputs": {"family": "sd1", "seed": 0}}
SUBDIR = "example_wf"  # our files in the server's models/loras (other tests write there too)
RELEASE_WORKFLOW = REPO / "example_workflows" / "texforce_official_release_with_unet_lora.json"
FUSE_WORKFLOW = REPO / "example_workflows" / "texforce_fuse_loras.json"
BEST_OF_N_WORKFLOW = REPO / "example_workflows" / "texforce_best_of_n.json"
# Real U-Net module names of the tiny SD1 model (kohya, diffusers-style block names) and their (out, in).
UNET_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 32),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (64, 32),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (64, 64),
}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# -- the converter on a hand-written workflow ---------------------------------------------------------

FAKE_INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["ckpt_name"]}, "output": ["MODEL", "CLIP"],
               "output_name": ["MODEL", "CLIP"], "display_name": "Load"},
    "V3Node": {
        "input": {
            "required": {"model": ["MODEL", {}], "mode": ["COMBO", {"options": ["x", "y"], "default": "x"}],
                         "seed": ["INT", {"default": 0}], "count": ["INT", {"control_after_generate": True}],
                         "noise_seed": ["INT", {"control_after_generate": False}]},
            "optional": {"text": ["STRING", {"forceInput": True}], "strength": ["FLOAT", {"default": 1.0}],
                         "pick": ["COMBO", {"options": ["p", "q"], "control_after_generate": True}],
                         "flag": ["BOOLEAN", {"default": False}], "clip": ["CLIP", {}]}},
        # the order the frontend creates widgets in; differs from the dicts' order on purpose
        "input_order": {"required": ["mode", "model", "seed", "count", "noise_seed"],
                        "optional": ["clip", "strength", "text", "pick", "flag"]},
        "output": ["MODEL", "FLOAT"], "output_name": ["MODEL", "FLOAT"], "display_name": "V3 node"},
    "Num": {"input": {"required": {"value": ["FLOAT", {}]}}, "output": ["FLOAT"], "output_name": ["FLOAT"]},
    "Sink": {"input": {"required": {"model": ["MODEL", {}], "value": ["INT", {"default": 3}]}}, "output": [],
             "output_name": []},
}


def _node(nid, type_, inputs=(), outputs=(), widgets=None, mode=0, **extra):
    n = {"id": nid, "type": type_, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": nid, "mode": mode,
         "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs], "properties": {}}
    if widgets is not None:
        n["widgets_values"] = widgets
    n.update(extra)
    return n


def _inp(name, type_, link=None, widget=False):
    d = {"name": name, "type": type_, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def _out(name, type_, links):
    return {"name": name, "type": type_, "links": list(links)}


def hand_written_workflow() -> dict:
    v3_widgets = ["y", 5, "randomize", 7, "fixed", 9, 0.5, "q", "increment", "", True]
    nodes = [
        _node(1, "Loader", outputs=[_out("MODEL", "MODEL", [1, 6]), _out("CLIP", "CLIP", [8])],
              widgets=["b.safetensors"]),
        _node(2, "Reroute", inputs=[_inp("", "*", 1)], outputs=[_out("", "MODEL", [2])]),
        _node(3, "V3Node", inputs=[_inp("model", "MODEL", 2), _inp("clip", "CLIP", 8), _inp("text", "STRING"),
                                   _inp("count", "INT", 3, widget=True), _inp("strength", "FLOAT", 4, widget=True)],
              outputs=[_out("MODEL", "MODEL", [9]), _out("FLOAT", "FLOAT", [])], widgets=v3_widgets,
              title="My V3"),
        _node(4, "PrimitiveNode", outputs=[_out("INT", "INT", [3])], widgets=[7, "fixed"]),
        _node(5, "Num", outputs=[_out("FLOAT", "FLOAT", [4])], widgets=[0.25]),
        _node(6, "Note", widgets=["just a note"]),
        _node(7, "Loader", outputs=[_out("MODEL", "MODEL", [5]), _out("CLIP", "CLIP", [])],
              widgets=["a.safetensors"], mode=2),  # muted
        _node(8, "Sink", inputs=[_inp("model", "MODEL", 5)], widgets=[1]),
        _node(9, "V3Node", inputs=[_inp("model", "MODEL", 6), _inp("clip", "CLIP"), _inp("text", "STRING")],
              outputs=[_out("MODEL", "MODEL", [7]), _out("FLOAT", "FLOAT", [])], widgets=v3_widgets, mode=4),
        _node(10, "Sink", inputs=[_inp("model", "MODEL", 7)], widgets=[2]),
        _node(11, "Sink", inputs=[_inp("model", "MODEL", 9)], widgets=[4]),
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 4, 0, 3, 3, "INT"], [4, 5, 0, 3, 4, "FLOAT"],
             [5, 7, 0, 8, 0, "MODEL"], [6, 1, 0, 9, 0, "MODEL"], [7, 9, 0, 10, 0, "MODEL"], [8, 1, 1, 3, 1, "CLIP"],
             [9, 3, 0, 11, 0, "MODEL"]]
    return {"last_node_id": 11, "last_link_id": 9, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def test_workflow_converter_on_a_hand_written_workflow():
    api = to_api(hand_written_workflow(), FAKE_INFO)
    # Note, PrimitiveNode and Reroute are UI-only; muted (7) and bypassed (9) nodes are not sent
    assert sorted(api, key=int) == ["1", "3", "5", "8", "10", "11"]
    assert api["1"] == {"class_type": "Loader", "inputs": {"ckpt_name": "b.safetensors"}, "_meta": {"title": "Load"}}
    assert api["3"]["_meta"] == {"title": "My V3"}
    assert api["3"]["inputs"] == {
        "mode": "y",            # V3 combo, first by input_order
        "model": ["1", 0],      # through the Reroute
        "seed": 5,              # named seed, no control_after_generate key: "randomize" after it skipped
        "count": 7,             # control_after_generate: "fixed" skipped; the PrimitiveNode leaves the value
        "noise_seed": 9,        # control_after_generate False: no extra value even though it is named noise_seed
        "clip": ["1", 1],
        "strength": ["5", 0],   # a linked widget input takes the link (its value 0.5 is still consumed)
        "pick": "q",            # combo with control: control and filter values skipped
        "flag": True,
    }                           # "text" (forceInput) has no widget and no link: absent
    assert api["8"]["inputs"] == {"value": 1}        # its MODEL came from the muted node: dropped
    assert api["10"]["inputs"] == {"model": ["1", 0], "value": 2}  # through the bypassed node's MODEL input
    assert api["11"]["inputs"] == {"model": ["3", 0], "value": 4}


def test_workflow_converter_details():
    info = FAKE_INFO["V3Node"]
    # dict-shaped widgets_values (some custom nodes save those); missing values take the defaults
    assert widget_values({"widgets_values": {"mode": "y", "seed": 3}}, info) == {
        "mode": "y", "seed": 3, "count": 0, "noise_seed": 0, "strength": 1.0, "pick": "p", "flag": False}
    assert widget_values({"widgets_values": ["y"]}, info)["strength"] == 1.0
    wf = hand_written_workflow()
    assert check_ui_workflow(wf, FAKE_INFO) == []
    assert node_types(wf) >= {"Note", "Reroute", "PrimitiveNode", "Loader"}
    wf["nodes"][0]["type"] = "RenamedLoader"
    assert missing_node_types(wf, FAKE_INFO) == {"RenamedLoader"}
    with pytest.raises(UnknownNodeType, match="RenamedLoader"):
        to_api(wf, FAKE_INFO)
    wf = hand_written_workflow()
    wf["nodes"][2]["widgets_values"] = wf["nodes"][2]["widgets_values"][:-1]
    assert any("10 widgets_values, the definition has 11" in p for p in check_ui_workflow(wf, FAKE_INFO))
    # list values are wrapped as the frontend does (a bare list would mean a link)
    wf["nodes"][0]["widgets_values"] = [["x", "y"]]
    assert to_api(wf, FAKE_INFO)["1"]["inputs"]["ckpt_name"] == {"__value__": ["x", "y"]}


@pytest.mark.parametrize("control", [True, False, "fixed", "increment", "decrement", "randomize"])
def test_workflow_converter_accepts_every_saved_seed_control(control):
    """The frontend saves a seed's control_after_generate as one of its modes, or as true/false in workflows
    from before the modes (comfyui-workflow-templates 0.1.95's default.json has `True`): all convert alike."""
    wf = hand_written_workflow()
    wf["nodes"][2]["widgets_values"][2] = control
    assert check_ui_workflow(wf, FAKE_INFO) == []
    assert to_api(wf, FAKE_INFO) == to_api(hand_written_workflow(), FAKE_INFO)
    assert is_control_value(control)


def test_workflow_checker_flags_values_shifted_into_a_control_slot():
    wf = hand_written_workflow()
    wf["nodes"][2]["widgets_values"] = list(wf["nodes"][2]["widgets_values"])  # node 9 shares the list
    wf["nodes"][2]["widgets_values"][2] = 20  # e.g. a workflow saved without the control value: steps moved up
    problems = check_ui_workflow(wf, FAKE_INFO)
    assert len(problems) == 1 and "control_after_generate = 20: not one of fixed, increment" in problems[0]
    assert not any(is_control_value(v) for v in (20, None, "random", ["fixed"], 1))


def test_workflow_substitute_keeps_ids_and_links():
    api = to_api(hand_written_workflow(), FAKE_INFO, meta=False)
    assert substitute(api, "Loader", {"class_type": "Tiny", "inputs": {"seed": 0}}, slot_map={1: 2}) == ["1"]
    assert api["1"] == {"class_type": "Tiny", "inputs": {"seed": 0}}
    assert api["3"]["inputs"]["model"] == ["1", 0] and api["3"]["inputs"]["clip"] == ["1", 2]
    assert set_inputs(api, "Sink", value=0) == ["8", "10", "11"]
    with pytest.raises(KeyError, match="no Loader node"):
        substitute(api, "Loader", {"class_type": "Tiny"})


# -- against the live server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.fixture(scope="module")
def lora_files(server):
    """The LoRA names the example workflows use -> files of the same kind written for the tiny SD1 model."""
    root = server.base / "models" / "loras"
    (root / SUBDIR).mkdir(parents=True, exist_ok=True)
    clip = tiny_models.tiny_clip("sd1", 0)
    # the official release layout: PEFT folder, adapter_model.bin pickle, scale from adapter_config.json
    write_peft_folder(root / SUBDIR / "sd15_texforce", random_lora(clip, seed=11), lora_alpha=4, r=4)
    # a kohya file with text-encoder and U-Net parts (what DPOK/ReFL/kohya trainers write)
    g = torch.Generator().manual_seed(12)
    sd = dict(as_kohya(random_lora(clip, seed=12)))
    for name, (out_f, in_f) in UNET_MODULES.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(4.0)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / SUBDIR / "unet_lora.safetensors"))
    # a text-encoder-only kohya LoRA (what TexForce training writes)
    save_file({k: v.contiguous() for k, v in as_kohya(random_lora(clip, seed=13)).items()},
              str(root / SUBDIR / "texforce_aesthetic.safetensors"))
    return {
        "sd15_texforce/adapter_model.bin": f"{SUBDIR}/sd15_texforce/adapter_model.bin",
        "unet_lora.safetensors": f"{SUBDIR}/unet_lora.safetensors",
        "texforce_aesthetic.safetensors": f"{SUBDIR}/texforce_aesthetic.safetensors",
    }


def for_tiny_model(api: dict, lora_files: dict) -> dict:
    """The checkpoint replaced by the tiny SD1 one, LoRA names pointed at our files, 64×64 and 2 steps."""
    substitute(api, "CheckpointLoaderSimple", TINY)  # MODEL/CLIP/VAE are slots 0/1/2 in both
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if re.fullmatch(r"lora_\d+", name) and value != "None":
                assert value in lora_files, f"node {nid}: the test has no file for {name} = {value!r}"
                node["inputs"][name] = lora_files[value]
    if nodes_of(api, "EmptyLatentImage"):
        set_inputs(api, "EmptyLatentImage", width=64, height=64, batch_size=1)
    set_inputs(api, "KSampler", steps=2)
    return api


def saved_images(server, entry: dict, api: dict) -> list[Path]:
    files = []
    for nid, _ in nodes_of(api, "SaveImage"):
        for img in entry["outputs"][nid]["images"]:
            files.append(server.base / "output" / img.get("subfolder", "") / img["filename"])
    return files


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_is_valid_for_the_frontend(path, object_info):
    wf = load(path)
    assert missing_node_types(wf, object_info) == set(), "a node was renamed or removed"
    assert check_ui_workflow(wf, object_info) == []
    for node in wf["nodes"]:
        assert node["mode"] == 0 and node["size"][0] > 0 and node["size"][1] > 0


def test_example_workflows_are_there():
    assert RELEASE_WORKFLOW in WORKFLOWS and FUSE_WORKFLOW in WORKFLOWS


def test_example_workflow_release_with_unet_lora_runs(server, object_info, lora_files):
    wf = load(RELEASE_WORKFLOW)
    api = to_api(wf, object_info)
    (lid, loader), = nodes_of(api, "TexForceLoraLoader")
    assert loader["inputs"]["lora_1"] == "sd15_texforce/adapter_model.bin"
    assert (loader["inputs"]["strength_1"], loader["inputs"]["on_1"]) == (1.0, True)
    assert (loader["inputs"]["lora_2"], loader["inputs"]["strength_2"]) == ("unet_lora.safetensors", 0.8)
    assert all(loader["inputs"][f"lora_{i}"] == "None" for i in range(3, 9))
    ckpt_id = nodes_of(api, "CheckpointLoaderSimple")[0][0]
    assert loader["inputs"]["clip"] == [ckpt_id, 1] and loader["inputs"]["model"] == [ckpt_id, 0]
    (_, ks), = nodes_of(api, "KSampler")
    assert ks["inputs"]["model"] == [lid, 1] and ks["inputs"]["seed"] == 42 and ks["inputs"]["sampler_name"] == "euler"
    assert any(n["type"] == "Note" and "models/loras/sd15_texforce" in n["widgets_values"][0] for n in wf["nodes"])

    for_tiny_model(api, lora_files)
    api["900"] = {"class_type": "PreviewAny", "inputs": {"source": [lid, 2]}}  # test only: read the report
    entry = server.run(api, timeout=120)
    assert entry["status"]["status_str"] == "success"
    images = saved_images(server, entry, api)
    assert len(images) == 1 and all(p.is_file() and p.stat().st_size > 0 for p in images)
    report = "".join(entry["outputs"]["900"]["text"])
    row1, row2 = report.split("[2]")
    assert "sd15_texforce/adapter_model.bin" in row1 and "clip_l" in row1
    assert "unet_lora.safetensors" in row2 and "clip_l" in row2
    assert re.search(rf"U-Net: {len(UNET_MODULES)} modules", row2), report


def test_example_workflow_fuse_runs(server, object_info, lora_files):
    api = to_api(load(FUSE_WORKFLOW), object_info)
    (fid, fuse), = nodes_of(api, "TexForceLoraFuse")
    assert (fuse["inputs"]["save_name"], fuse["inputs"]["overwrite"]) == ("texforce/fused", False)
    assert (fuse["inputs"]["lora_1"], fuse["inputs"]["weight_1"]) == ("sd15_texforce/adapter_model.bin", 0.7)
    assert (fuse["inputs"]["lora_2"], fuse["inputs"]["weight_2"]) == ("texforce_aesthetic.safetensors", 0.3)
    assert all(fuse["inputs"][f"lora_{i}"] == "None" for i in range(3, 9))
    assert all(n["inputs"]["clip"] == [fid, 0] for _, n in nodes_of(api, "CLIPTextEncode"))

    for_tiny_model(api, lora_files)
    save_name = f"{SUBDIR}/fused_{uuid.uuid4().hex[:8]}"  # unique: the node never overwrites silently
    fuse["inputs"]["save_name"] = save_name
    entry = server.run(api, timeout=120)
    assert entry["status"]["status_str"] == "success"
    images = saved_images(server, entry, api)
    assert len(images) == 1 and all(p.is_file() and p.stat().st_size > 0 for p in images)
    assert (server.base / "models" / "loras" / f"{save_name}.safetensors").is_file()
    # the same save name again, overwrite off: refused (a new seed so that nothing is cached)
    set_inputs(api, "KSampler", seed=43)
    fuse["inputs"]["weight_2"] = 0.35
    with pytest.raises(ComfyError, match="already exists"):
        server.run(api, timeout=120)


@pytest.fixture(scope="module")
def reward_files(server):
    """models/reward_models of the server filled with tiny models under the published names (the aesthetic
    head is the real file); left as it is when another test already filled it."""
    root = server.base / "models" / "reward_models"
    clip_config, head = root / "clip-vit-large-patch14" / "config.json", root / AESTHETIC_HEAD_FILE.name
    if not (clip_config.is_file() and head.is_file()):
        reward_models_folder(root)
    return root


def test_example_workflow_best_of_n_runs(server, object_info, reward_files):
    assert BEST_OF_N_WORKFLOW in WORKFLOWS
    wf = load(BEST_OF_N_WORKFLOW)
    assert missing_node_types(wf, object_info) == set()
    assert node_types(wf) == {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
                              "TexForceRewardModelLoader", "TexForceScoreImages", "SaveImage", "PreviewImage", "Note"}
    note = next(n for n in wf["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "models/reward_models" in note and AESTHETIC_HEAD_FILE.name in note and "clip-vit-large-patch14/" in note
    api = to_api(wf, object_info)
    (_, latent), = nodes_of(api, "EmptyLatentImage")
    assert (latent["inputs"]["width"], latent["inputs"]["height"], latent["inputs"]["batch_size"]) == (512, 512, 8)
    (rid, loader), = nodes_of(api, "TexForceRewardModelLoader")
    assert loader["inputs"] == {"kind": "aesthetic (LAION, CLIP ViT-L/14)", "model": "(auto: published name)",
                                "clip_model": "(auto: published name)"}
    (sid, score), = nodes_of(api, "TexForceScoreImages")
    top_k = score["inputs"]["top_k"]
    assert top_k == 2 and score["inputs"]["reward"] == [rid, 0] and score["inputs"]["prompt"].strip()
    (vid, _), = nodes_of(api, "VAEDecode")
    assert score["inputs"]["images"] == [vid, 0]
    (_, save), = nodes_of(api, "SaveImage")
    assert save["inputs"]["images"] == [sid, 3]  # sorted_images: the best top_k
    (pid, preview), = nodes_of(api, "PreviewImage")
    assert preview["inputs"]["images"] == [vid, 0]  # all of the batch

    for_tiny_model(api, {})
    set_inputs(api, "EmptyLatentImage", batch_size=4)
    entry = server.run(api, timeout=180)
    assert entry["status"]["status_str"] == "success"
    images = saved_images(server, entry, api)
    assert len(images) == top_k and all(p.is_file() and p.stat().st_size > 0 for p in images)
    assert len(entry["outputs"][pid]["images"]) == 4
    text = entry["outputs"][sid]["text"][0]
    assert text.startswith("aesthetic: mean") and "over 4 images" in text
    assert len(text.splitlines()) == 2 + top_k  # summary, header, one row per kept image


def _default_template() -> Path | None:
    for pkg in ("comfyui_workflow_templates_media_other", "comfyui_workflow_templates"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "templates" / "default.json"
            if path.is_file():
                return path
    return None


# comfyui-workflow-templates 0.1.95's default.json (GPL-3.0, as ComfyUI): its seed control is saved as `True`
OLD_DEFAULT_TEMPLATE = REPO / "tests" / "data" / "workflows" / "comfyui_default_template_0.1.95.json"


@pytest.mark.parametrize("which", ["installed", "0.1.95"])
def test_workflow_converter_on_comfyuis_default_template(server, object_info, which):
    """ComfyUI's own text-to-image template, as its frontend saved it, converts and runs: the one installed
    with ComfyUI and an older release's (whose seed control value is a legacy boolean)."""
    path = _default_template() if which == "installed" else OLD_DEFAULT_TEMPLATE
    if path is None:
        pytest.skip("comfyui_workflow_templates is not installed")
    wf = load(path)
    api = to_api(wf, object_info)
    assert {n["class_type"] for n in api.values()} == {
        "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"}
    (_, ks), = nodes_of(api, "KSampler")
    saved = next(n for n in wf["nodes"] if n["type"] == "KSampler")["widgets_values"]
    assert is_control_value(saved[1])  # the control value that is skipped ("randomize", or True in older templates)
    assert [ks["inputs"][k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")] == \
        [saved[0], *saved[2:]]
    for_tiny_model(api, {})
    entry = server.run(api, timeout=120)
    assert all(p.is_file() for p in saved_images(server, entry, api))


FLUX_WORKFLOW = REPO / "example_workflows" / "texforce_train_flux.json"


def test_example_workflow_train_flux_runs(server, object_info):
    """The Flux template (flow_grpo preset, T5 only, cfg-1 euler / simple comparison) on the tiny Flux checkpoint,
    shrunk to one epoch of 4 images at 64²: it trains a te3 file and renders before | after."""
    api = to_api(load(FLUX_WORKFLOW), object_info)
    (_, train), = nodes_of(api, "TexForceTrain")
    assert (train["inputs"]["preset"], train["inputs"]["text_encoders"]) == ("flow_grpo", "t5xxl")
    assert (train["inputs"]["steps"], train["inputs"]["eta"], train["inputs"]["guidance"]) == (10, 0.7, 3.5)
    assert all(ks["inputs"]["cfg"] == 1.0 and ks["inputs"]["scheduler"] == "simple" for _, ks in nodes_of(api, "KSampler"))
    substitute(api, "CheckpointLoaderSimple", {**TINY, "inputs": {"family": "flux", "seed": 0}})
    set_inputs(api, "TexForceTrain", prompts="a photo of a cat\na photo of a dog", epochs=1, images_per_epoch=4,
               images_per_prompt=2, batch_size=2, width=64, height=64, steps=2, lora_name="example_wf/flux_t5")
    set_inputs(api, "EmptyLatentImage", width=64, height=64, batch_size=1)
    set_inputs(api, "KSampler", steps=2)
    entry = server.run(api, timeout=300)
    assert entry["status"]["status_str"] == "success"
    assert all(p.is_file() for p in saved_images(server, entry, api))
    lora = server.base / "models" / "loras" / "texforce" / "example_wf" / "flux_t5.safetensors"
    from safetensors import safe_open

    with safe_open(str(lora), framework="pt") as f:
        assert {k.split("_", 2)[1] for k in f.keys()} == {"te3"} and f.metadata()["texforce.family"] == "flux"
