"""The server side of the browser's training chart: the run registry (nodes/progress.py) and its read-only
/texforce/ routes, in-process and on the live server (bad requests included), and the training example
workflow run through /prompt with the tiny checkpoint, checked against what the routes report.
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image
from comfy_server import ComfyError, RunProgress, format_epoch
from conftest import PACK_NAME, REPO
from workflow_api import nodes_of, set_inputs, substitute, to_api

progress = importlib.import_module(f"{PACK_NAME}.nodes.progress")
TRAIN_WORKFLOW = REPO / "example_workflows" / "texforce_train_compare.json"
TINY = {"class_type": "TexForceTestTinyCheckpoint", "inputs": {"family": "sd1", "seed": 0}}
# the tiny settings the browser test uses too: 4 images of 64² with 3 steps per epoch
TINY_TRAINING = dict(images_per_epoch=4, images_per_prompt=2, batch_size=2, width=64, height=64, steps=3,
                     lora_rank=4, advantage="batch", prompts="a photo of a cat\na photo of a dog")


def event(run="r", status="running", epoch=1, **stats):
    base = {"node": "3", "run": run, "status": status, "epochs": 5, "epoch": epoch}
    if status == "running":
        base.update(reward_mean=0.1 * epoch, reward_std=0.01, approx_kl=1e-6, clipfrac=0.0, n_images=4)
    base.update(stats)
    return base


# -- names ------------------------------------------------------------------------------------------------

# the longest file name part: 255 bytes with ".safetensors"; a name of several parts may be up to 255 characters
LONGEST_PART = "x" * 243


@pytest.mark.parametrize("name", ["run", "texforce_jpeg", "exp/run 1", " padded ", "a.b", LONGEST_PART,
                                  "é" * 121, f"a/{LONGEST_PART[:252]}", "ünïcode/名前"])
def test_run_names_the_node_accepts(name):
    assert progress.check_run_name(name) == name.strip()


@pytest.mark.parametrize("name", ["", "   ", "..", "../x", "a/../b", "a\\..\\b", "/etc/passwd", "\\\\server\\share",
                                  "C:\\windows", "c:x", "x" * 244, "é" * 122, "a/" * 128 + "b", "x" * 5000, "a\nb",
                                  "a\x00b", "a\u202eb", "a\u2028b", "a//b", "a/./b", "a/", "a/ /b", "a?b", "a*b",
                                  None, 3, ["a"]])
def test_run_names_refused(name):
    with pytest.raises(progress.BadRunName):
        progress.check_run_name(name)


# -- the registry -----------------------------------------------------------------------------------------

def test_registry_follows_a_run_from_epochs_to_done():
    reg = progress.RunRegistry(clock=iter(range(100, 200)).__next__)
    reg.record(event(epoch=1))
    reg.record(event(epoch=2, reward_mean=float("nan"), extra="text", nested={"a": 1}))
    reg.record({"node": "3", "run": "r", "status": "done", "epochs": 5, "epoch": 2, "seconds": 3.5})
    (summary,) = reg.runs()
    assert summary == {"run": "r", "status": "done", "epoch": 2, "epochs": 5, "updated": 102}
    full = reg.get("r")
    assert full["node"] == "3" and full["started"] == 100 and full["seconds"] == 3.5 and full["error"] is None
    assert [h["epoch"] for h in full["history"]] == [1, 2]
    assert full["history"][0]["reward_mean"] == pytest.approx(0.1) and full["history"][0]["n_images"] == 4
    # NaN cannot go into JSON for a browser: it becomes null; non-numbers are not statistics
    assert full["history"][1]["reward_mean"] is None and "extra" not in full["history"][1]
    assert "nested" not in full["history"][1] and "run" not in full["history"][1]
    json.dumps(full, allow_nan=False)
    assert reg.get("other") is None


def test_registry_cancel_failure_and_resume():
    reg = progress.RunRegistry()
    reg.record(event(epoch=1))
    reg.record(event(epoch=2))
    reg.record({"node": "3", "run": "r", "status": "cancelled", "epoch": 2})
    assert reg.get("r")["status"] == "cancelled" and reg.get("r")["epoch"] == 2
    # resumed: a cancel before any new epoch reports epoch 0; what was trained is kept
    reg.record({"node": "7", "run": "r", "status": "cancelled", "epoch": 0})
    assert reg.get("r")["epoch"] == 2 and reg.get("r")["node"] == "7"
    reg.record(event(epoch=3))
    reg.record({"node": "3", "run": "r", "status": "failed", "error": "x" * 5000, "epoch": 3})
    full = reg.get("r")
    assert full["status"] == "failed" and len(full["error"]) == progress.MAX_ERROR
    assert [h["epoch"] for h in full["history"]] == [1, 2, 3]
    reg.record(event(epoch=4))  # queued again: running, the error is gone
    assert reg.get("r")["status"] == "running" and reg.get("r")["error"] is None
    # the run started again from epoch 2 (files deleted by hand): later epochs are dropped
    reg.record(event(epoch=2, reward_mean=9.0))
    assert [h["epoch"] for h in reg.get("r")["history"]] == [1, 2] and reg.get("r")["history"][1]["reward_mean"] == 9


def test_registry_ignores_malformed_events():
    reg = progress.RunRegistry()
    for bad in (None, [], {}, {"run": "r"}, {"run": "r", "status": "exploded"}, {"run": "../x", "status": "running"},
                {"run": "", "status": "done"}, {"run": 5, "status": "done"}):
        assert reg.record(bad) is None
    assert reg.runs() == []
    reg.record(event(epoch=True))  # not an epoch number: the run is known, no history line
    assert reg.get("r")["history"] == []
    progress.record(object())  # the module-level function never raises


def test_registry_seeds_a_resumed_run_from_its_history_file(tmp_path):
    lines = [json.dumps({"epoch": e, "reward_mean": e / 10, "reward_std": 0.1, "approx_kl": 0.0, "clipfrac": 0.0})
             for e in (1, 2, 3)]
    (tmp_path / "history.jsonl").write_text("\n".join(lines[:2]) + "\nnot json\n{\"epoch\": -1}\n" + lines[2] + "\n")
    asked = []

    def history_file(name):
        asked.append(name)
        return tmp_path / "history.jsonl"

    reg = progress.RunRegistry()
    reg.record(event(run="resumed", epoch=4), history_file)
    assert [h["epoch"] for h in reg.get("resumed")["history"]] == [1, 2, 3, 4]
    reg.record(event(run="resumed", epoch=5), history_file)
    assert asked == ["resumed"]  # read once, when the run is first seen
    # a cancelled event for a run never seen (server restarted, cancelled in the first new epoch)
    reg.record({"run": "other", "status": "cancelled", "epoch": 0}, history_file)
    assert reg.get("other")["epoch"] == 3 and len(reg.get("other")["history"]) == 3
    # no file, or a locator that fails: an empty history, no exception
    reg.record(event(run="fresh"), lambda name: tmp_path / "missing.jsonl")
    reg.record(event(run="broken"), lambda name: 1 / 0)
    assert len(reg.get("fresh")["history"]) == 1 and len(reg.get("broken")["history"]) == 1


def test_registry_is_bounded(monkeypatch, tmp_path):
    monkeypatch.setattr(progress, "MAX_HISTORY", 5)
    reg = progress.RunRegistry(max_runs=3)
    for e in range(1, 12):
        reg.record(event(epoch=e))
    assert [h["epoch"] for h in reg.get("r")["history"]] == [7, 8, 9, 10, 11]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, 100)))
    assert [h["epoch"] for h in progress.read_history_file(tmp_path / "h.jsonl", limit=3)] == [97, 98, 99]
    reg.record({"run": "done1", "status": "done", "epoch": 1})
    reg.record(event(run="live"))
    reg.record(event(run="live2"))  # 4 runs: the oldest finished one goes, running ones stay
    assert {r["run"] for r in reg.runs()} == {"r", "live", "live2"}
    assert [r["run"] for r in reg.runs()][0] == "live2"  # newest first


def test_routes_are_not_registered_without_a_server(monkeypatch):
    monkeypatch.setattr(progress, "_registered", False)
    monkeypatch.delitem(__import__("sys").modules, "server", raising=False)
    assert progress.register_routes() is False
    assert [(m, p) for m, p, _ in progress.routes()] == [
        ("GET", "/texforce/runs"), ("GET", "/texforce/runs/"), ("GET", r"/texforce/runs/{run:[\s\S]+}")]


# -- the live server --------------------------------------------------------------------------------------

def http_get(server, path: str):
    """(status, JSON body, content type) of a GET, errors included."""
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            data = json.loads(body)
        except ValueError:
            data = body.decode("utf-8", "replace")
        return e.code, data, e.headers.get("Content-Type", "")


BAD_NAMES = ["..%2F..%2Fetc", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..", "a%2F..%2F..%2Fb",
             "C%3A%5Cwindows", "x" * 5000, "a%00b", "%0a", "..%5C..%5Cwindows", "", "%20"]


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_routes_refuse_bad_requests_on_the_live_server(server, prefix):
    status, runs, ctype = http_get(server, f"{prefix}/texforce/runs")
    assert status == 200 and isinstance(runs, list) and ctype.startswith("application/json")
    for name in BAD_NAMES:
        status, body, ctype = http_get(server, f"{prefix}/texforce/runs/{name}")
        assert status == 400, (name, status, body)
        assert ctype.startswith("application/json") and "bad run name" in body["error"]
        assert str(server.base) not in json.dumps(body)
    status, body, _ = http_get(server, f"{prefix}/texforce/runs/no_such_run_{uuid.uuid4().hex}")
    assert status == 404 and body == {"error": "unknown run"}
    # read-only: no other method
    for method in ("POST", "PUT", "DELETE"):
        req = urllib.request.Request(server.url + f"{prefix}/texforce/runs", data=b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 405


def for_tiny_training(api: dict, run: str, epochs: int) -> dict:
    substitute(api, "CheckpointLoaderSimple", copy.deepcopy(TINY))
    set_inputs(api, "TexForceTrain", epochs=epochs, lora_name=run, **TINY_TRAINING)
    set_inputs(api, "EmptyLatentImage", width=64, height=64)
    set_inputs(api, "KSampler", steps=2)
    return api


def test_training_example_runs_and_the_routes_report_its_history(server):
    wf = json.loads(TRAIN_WORKFLOW.read_text(encoding="utf-8"))
    api = to_api(wf, server.object_info())
    (_, train), = nodes_of(api, "TexForceTrain")
    assert train["inputs"]["preset"] == "texforce" and train["inputs"]["resume"] is True
    ks = [n for _, n in nodes_of(api, "KSampler")]
    assert len(ks) == 2 and ks[0]["inputs"]["seed"] == ks[1]["inputs"]["seed"]  # before/after: the same seed
    encoders = {n["inputs"]["clip"][0] for _, n in nodes_of(api, "CLIPTextEncode")}
    assert len(encoders) == 2  # the original CLIP and the trained one

    run = f"web_example/{uuid.uuid4().hex[:8]}"  # a sub-folder name: the route takes it URL-encoded
    seen = []  # what a client following the run (the demo) is told, epoch by epoch
    follow = RunProgress(server, run, on_epoch=lambda stats, epochs: seen.append((stats["epoch"], epochs)),
                         interval=0.2)
    entry = server.run(for_tiny_training(api, run, epochs=2), timeout=300, progress=follow)
    assert entry["status"]["status_str"] == "success"
    assert seen == [(1, 2), (2, 2)] and follow.status == "done"
    (sid,) = [i for i, n in nodes_of(api, "SaveImage") if n["inputs"]["filename_prefix"].endswith("before_after")]
    (img,) = entry["outputs"][sid]["images"]
    with Image.open(server.base / "output" / img["subfolder"] / img["filename"]) as im:
        assert im.size == (64 + 8 + 64, 64)  # before | after, side by side

    status, runs, _ = http_get(server, "/texforce/runs")
    mine = [r for r in runs if r["run"] == run]
    assert mine and mine[0]["status"] == "done" and (mine[0]["epoch"], mine[0]["epochs"]) == (2, 2)
    status, full, _ = http_get(server, "/api/texforce/runs/" + urllib.request.quote(run, safe=""))
    assert status == 200 and full["status"] == "done" and full["error"] is None
    on_disk = [json.loads(line) for line in
               (server.base / "output" / "texforce" / run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in full["history"]] == [1, 2]
    for served, saved in zip(full["history"], on_disk):
        for key in ("reward_mean", "reward_std", "approx_kl", "clipfrac"):
            assert math.isclose(served[key], saved[key], rel_tol=1e-12, abs_tol=1e-30), key
    text = json.dumps(full) + json.dumps(runs)
    assert str(server.base) not in text and str(Path.home()) not in text  # no file-system paths


def test_epoch_lines_for_a_terminal():
    stats = {"epoch": 3, "reward_mean": -4.12345, "reward_std": 0.5, "seconds_sampling": 1.0,
             "seconds_reward": 0.25, "seconds_training": 2.0}
    assert format_epoch(stats, 30) == "epoch 3/30  reward -4.123 ± 0.5  (3.2 s)"
    assert format_epoch({"epoch": 1, "reward_mean": None}, None) == "epoch 1  reward n/a ± n/a"


def test_an_interrupt_from_comfyuis_progress_hook_is_recorded_as_cancelled():
    class InterruptProcessingException(Exception):  # ComfyUI's, raised by its progress hook on Cancel
        pass

    reg = progress.RunRegistry()
    reg.record(event(epoch=1))
    try:
        raise InterruptProcessingException()
    except InterruptProcessingException:
        reg.record({"run": "r", "status": "failed", "error": "", "epoch": 1})
    assert reg.get("r")["status"] == "cancelled" and reg.get("r")["error"] is None
    try:
        raise RuntimeError("out of memory")
    except RuntimeError:
        reg.record({"run": "r", "status": "failed", "error": "out of memory", "epoch": 1})
    assert reg.get("r")["status"] == "failed" and reg.get("r")["error"] == "out of memory"


def test_cancel_on_the_live_server_is_reported_as_cancelled(server):
    run = f"web_cancel_api_{uuid.uuid4().hex[:8]}"
    api = for_tiny_training(to_api(json.loads(TRAIN_WORKFLOW.read_text(encoding="utf-8")), server.object_info()),
                            run, epochs=500)
    prompt_id = server.queue(api)
    deadline = time.monotonic() + 240
    while not any(r["run"] == run and r["epoch"] >= 1 for r in http_get(server, "/texforce/runs")[1]):
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.1)
    server.post_json("/interrupt", {})
    with pytest.raises(ComfyError):
        server.wait(prompt_id, timeout=240)
    status, full, _ = http_get(server, f"/texforce/runs/{run}")
    assert status == 200 and full["status"] == "cancelled" and full["error"] is None
    assert 1 <= full["epoch"] < 500 and [h["epoch"] for h in full["history"]] == list(range(1, full["epoch"] + 1))
