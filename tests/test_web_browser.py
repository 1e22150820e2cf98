"""The pack in a real browser: Debian's chromium driven by playwright (Python) on the ComfyUI page of the
session's test server.

The page must show the pack's nodes in the node library, load the training example (tiny checkpoint
substituted, tiny settings), queue it and draw the live reward chart epoch by epoch, redraw it after a
reload from the server's /texforce/ routes, show cancelled and failed runs as such, and show the scores of
TexForce Score Images on the node. Any JavaScript error (console error or uncaught exception) fails the
test. Screenshots go to artifacts/ (git-ignored).

The browser is /usr/bin/chromium (`apt-get install chromium`; .ci/run installs it); playwright's own
browsers are never downloaded. Without chromium or the playwright package the tests skip, except in CI
(the CI variable set), where they fail.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import uuid
from pathlib import Path

import pytest
from conftest import REPO

CHROMIUM = Path(os.environ.get("TEXFORCE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "artifacts"
TRAIN_WORKFLOW = REPO / "example_workflows" / "texforce_train_compare.json"
PACK_NODES = ["TexForceLoraLoader", "TexForceLoraFuse", "TexForceTrain", "TexForceJPEGReward"]
TINY_TRAINING = dict(images_per_epoch=4, images_per_prompt=2, batch_size=2, width=64, height=64, steps=3,
                     lora_rank=4, advantage="batch", prompts="a photo of a cat\na photo of a dog")
# ComfyUI_frontend 1.32 logs this on every start-up, with no custom nodes loaded (the setting store's onChange
# for a setting registered later; Comfy-Org/ComfyUI_frontend#6747). It is the only console error let through.
KNOWN_FRONTEND_ERRORS = [re.compile(r"^TypeError: Cannot read properties of undefined \(reading 'id'\)\s+"
                                    r"at onChange \([^)]*/assets/index-[^)]*\)\s+at Proxy\.set \(")]


def _missing() -> list[str]:
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} is missing: install Debian's chromium (sudo apt-get install chromium), or set "
                       "TEXFORCE_CHROMIUM to a chromium binary")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright Python package is missing (pip install -r requirements-dev.txt)")
    return missing


# Without them: one skip line for the whole module (make test prints its reason), before any server starts;
# with CI set, the browser fixture fails instead.
if _missing() and not os.environ.get("CI"):
    pytest.skip("browser tests skipped: " + "; ".join(_missing()), allow_module_level=True)


def _playwright():
    missing = _missing()
    if missing:
        pytest.fail("browser tests need chromium and playwright: " + "; ".join(missing)
                    + " (CI is set: the browser tests must run)")
    from playwright.sync_api import sync_playwright

    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def prepare_user(server) -> None:
    """A returning user's ComfyUI: tutorial seen (no templates dialog over the canvas), and the user files
    a fresh install 404s on (user.css, workflow folders, the legacy templates file) present."""
    server.post_json("/settings", {"Comfy.TutorialCompleted": True})
    user = server.base / "user" / "default"
    for d in ("workflows", "subgraphs"):
        (user / d).mkdir(parents=True, exist_ok=True)
    (user / "user.css").touch()
    templates = user / "comfy.templates.json"
    if not templates.exists():
        templates.write_text("[]")


class Page:
    """A ComfyUI page with every console error, uncaught exception and failed request recorded."""

    def __init__(self, browser, server):
        self.server = server
        self.context = browser.new_context(viewport={"width": 1600, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.route("**/*", self._route)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}\n{getattr(e, 'stack', '')}"))
        # net::ERR_ABORTED is the browser cancelling a request itself (a reload drops the images still loading),
        # not an answer of the server: not an error of the page
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url} {r.failure}")
                     if r.url.startswith(server.url) and "texforce" in r.url.lower()
                     and r.failure != "net::ERR_ABORTED" else None)

    def _route(self, route):
        url = route.request.url
        if not url.startswith(self.server.url + "/"):
            # no network here: the page's calls to comfy.org and other hosts get an empty answer
            return route.fulfill(status=200, content_type="application/json",
                                 body="[]" if "/releases" in url else "{}")
        path = url[len(self.server.url):].split("?")[0]
        if path == "/favicon.ico":  # ComfyUI serves none
            return route.fulfill(status=204, body="")
        if path == "/user.css":  # the stylesheet link of index.html; ComfyUI's web root has none
            return route.fulfill(status=200, content_type="text/css", body="")
        return route.continue_()

    def _console(self, msg):
        text = msg.text
        if msg.type == "error":
            if any(p.search(text) for p in KNOWN_FRONTEND_ERRORS) and "texforce" not in text.lower():
                return
            where = msg.location.get("url", "") if msg.location else ""
            self.errors.append(f"console error: {text} ({where})")
        elif msg.type == "warning" and "texforce" in text.lower():
            self.errors.append(f"console warning: {text}")

    def open(self) -> None:
        self.page.goto(self.server.url + "/", wait_until="load")
        self.page.wait_for_function(
            "() => window.app?.graph && window.LiteGraph && app.extensions?.some(e => e.name === 'texforce.web')"
            " && Object.keys(LiteGraph.registered_node_types).includes('TexForceTrain')", timeout=90_000)
        self.page.wait_for_timeout(500)  # let start-up settle (restored tabs, settings)

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def wait_for(self, script: str, arg=None, timeout: float = 240_000):
        return self.page.wait_for_function(script, arg=arg, timeout=timeout, polling=100).json_value()

    def train_state(self) -> dict:
        return self.evaluate("() => app.graph._nodes.find(n => n.type === 'TexForceTrain').texforceState()")

    def show(self, node_type: str) -> None:
        """The view centred on the first node of that type, at scale 1 (its DOM widgets visible)."""
        self.evaluate("""(type) => {
            const n = app.graph._nodes.find(n => n.type === type);
            const c = app.canvas, rect = c.canvas.getBoundingClientRect();
            c.ds.scale = 1;
            c.ds.offset = [rect.width / 2 - n.pos[0] - n.size[0] / 2,
                           Math.max(60, rect.height / 2 - n.size[1] / 2) - n.pos[1]];
            c.setDirty(true, true);
        }""", node_type)
        self.page.wait_for_timeout(300)

    def screenshot(self, name: str, node_type: str | None = None) -> Path:
        """A screenshot into artifacts/ (dialogs closed); with node_type, centred on that node."""
        self.page.keyboard.press("Escape")
        if node_type:
            self.show(node_type)
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def assert_no_js_errors(self) -> None:
        assert not self.errors, "JavaScript errors in the page:\n" + "\n".join(self.errors)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, server):
    prepare_user(server)
    p = Page(browser, server)
    try:
        yield p
    finally:
        p.close()


def training_workflow(run: str, epochs: int, **overrides) -> dict:
    """The training example as the frontend loads it, on the tiny checkpoint (test-only node)."""
    wf = json.loads(TRAIN_WORKFLOW.read_text(encoding="utf-8"))
    for node in wf["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            # same outputs MODEL/CLIP/VAE; widgets family, seed (+ its control value), prompt_controls_image
            node.update(type="TexForceTestTinyCheckpoint", widgets_values=["sd1", 0, "fixed", False],
                        properties={"Node name for S&R": "TexForceTestTinyCheckpoint"})
    settings = {**TINY_TRAINING, "epochs": epochs, "lora_name": run, **overrides}
    return {"workflow": wf, "widgets": {"TexForceTrain": settings, "EmptyLatentImage": {"width": 64, "height": 64},
                                        "KSampler": {"steps": 2}}}


LOAD_AND_SET = """async ({workflow, widgets}) => {
    await app.loadGraphData(workflow);
    for (const [type, values] of Object.entries(widgets)) {
        const nodes = app.graph._nodes.filter(n => n.type === type);
        if (!nodes.length) throw new Error('no ' + type + ' node');
        for (const n of nodes) for (const [name, value] of Object.entries(values)) {
            const w = n.widgets.find(w => w.name === name);
            if (!w) throw new Error(type + ' has no widget ' + name);
            w.value = value;
        }
    }
}"""

# Every progress event as the chart saw it, right after the extension handled it.
RECORD_EVENTS = """() => {
    window.__texforceSeen = [];
    window.comfyAPI.api.api.addEventListener('texforce.progress', (e) => setTimeout(() => {
        const node = app.graph._nodes.find(n => n.type === 'TexForceTrain');
        const s = node.texforceState();
        window.__texforceSeen.push({event: e.detail.status, epoch: e.detail.epoch, status: s.status,
                                    points: s.points, drawn: s.drawn});
    }, 0));
}"""


def queue(page: Page) -> None:
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")


def test_pack_nodes_are_in_the_node_library(page):
    page.open()
    found = page.evaluate("""(types) => types.map(t => {
        const c = LiteGraph.registered_node_types[t];
        return c ? [t, c.category, c.title] : [t, null, null];
    })""", PACK_NODES)
    for node_type, category, title in found:
        assert category and category.startswith("TexForce/"), (node_type, category)
        assert title
    # the node library (search box / side bar) lists them from the node definition store
    listed = page.evaluate("""() => {
        const defs = LiteGraph.registered_node_types;
        return Object.keys(defs).filter(k => k.startsWith('TexForce'));
    }""")
    assert set(PACK_NODES) <= set(listed)
    # the extension is served from WEB_DIRECTORY and registered once
    names = page.evaluate("() => app.extensions.map(e => e.name)")
    assert names.count("texforce.web") == 1
    page.assert_no_js_errors()


def test_training_example_draws_the_live_chart_and_redraws_it_after_a_reload(page, server):
    run = f"web_{uuid.uuid4().hex[:8]}"
    page.open()
    page.evaluate(LOAD_AND_SET, training_workflow(run, epochs=3))
    state = page.train_state()
    assert state["run"] == run and state["status"] == "idle" and state["points"] == 0
    # the chart widget is not an input: not in the saved workflow, not in the prompt
    saved = page.evaluate("() => app.graph._nodes.find(n => n.type === 'TexForceTrain').serialize().widgets_values")
    # ..., text_encoders, optimizer_steps, gradient_checkpointing, sde_steps
    assert len(saved) == 22 and saved[-6:] == [run, True, "all", 0, "auto", -1]
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    (train,) = [n for n in prompt.values() if n["class_type"] == "TexForceTrain"]
    assert "texforce_chart" not in train["inputs"] and train["inputs"]["epochs"] == 3

    page.show("TexForceTrain")
    page.evaluate(RECORD_EVENTS)
    queue(page)
    page.wait_for("() => { const s = app.graph._nodes.find(n => n.type === 'TexForceTrain').texforceState();"
                  " return s.status === 'done' || s.status === 'failed'; }")
    state = page.train_state()
    assert state["status"] == "done", state["text"]
    assert state["points"] == 3 and state["drawn"] == 3 and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert all(isinstance(h["reward_mean"], float) for h in state["history"])
    assert state["text"] == "done: 3/3 epochs"
    seen = page.evaluate("() => window.__texforceSeen")
    # live: the chart grew with each epoch's event while the run was going
    running = [s for s in seen if s["event"] == "running"]
    assert [(s["epoch"], s["status"], s["points"], s["drawn"]) for s in running] == [
        (1, "running", 1, 1), (2, "running", 2, 2), (3, "running", 3, 3)]
    metrics = page.evaluate("() => app.graph._nodes.find(n => n.type === 'TexForceTrain').texforce.metrics"
                            ".textContent")
    assert re.match(r"reward -?[\d.e+-]+ ± [\d.e+-]+ · approx-KL [\d.e+-]+ · clip frac [\d.e+-]+$", metrics), metrics
    shot = page.screenshot("web_training_chart", "TexForceTrain")
    assert shot.stat().st_size > 10_000
    # what the server keeps for a reload
    server_run = server.get_json(f"/texforce/runs/{run}")
    assert [h["epoch"] for h in server_run["history"]] == [1, 2, 3]

    # a reload: the chart asks the server for the run's history and redraws it
    page.page.reload(wait_until="load")
    page.wait_for("(run) => { const n = window.app?.graph?._nodes?.find(n => n.type === 'TexForceTrain');"
                  " const s = n?.texforceState?.(); return s && s.run === run && s.points === 3; }",
                  run, timeout=90_000)
    page.show("TexForceTrain")
    page.wait_for("() => app.graph._nodes.find(n => n.type === 'TexForceTrain').texforceState().drawn === 3")
    after = page.train_state()
    assert after["status"] == "done" and after["points"] == 3
    assert [h["reward_mean"] for h in after["history"]] == pytest.approx([h["reward_mean"] for h in state["history"]])
    page.screenshot("web_training_chart_after_reload", "TexForceTrain")
    page.assert_no_js_errors()


def test_cancelled_and_failed_runs_are_shown_as_such(page, server):
    run = f"web_cancel_{uuid.uuid4().hex[:8]}"
    page.open()
    page.evaluate(LOAD_AND_SET, training_workflow(run, epochs=500))
    page.show("TexForceTrain")
    queue(page)
    page.wait_for("() => app.graph._nodes.find(n => n.type === 'TexForceTrain').texforceState().points >= 1")
    page.evaluate("async () => { await window.comfyAPI.api.api.interrupt(); }")
    page.wait_for("() => app.graph._nodes.find(n => n.type === 'TexForceTrain').texforceState().status === "
                  "'cancelled'")
    state = page.train_state()
    assert 1 <= state["points"] < 500 and state["text"].startswith("cancelled after epoch")
    assert page.evaluate("() => app.graph._nodes.find(n => n.type === 'TexForceTrain').texforce.element"
                         ".dataset.status") == "cancelled"
    page.screenshot("web_training_cancelled", "TexForceTrain")
    # the server kept it: after a reload the chart still says cancelled, with the epochs trained
    page.page.reload(wait_until="load")
    page.wait_for("(run) => { const n = window.app?.graph?._nodes?.find(n => n.type === 'TexForceTrain');"
                  " const s = n?.texforceState?.(); return s && s.run === run && s.status === 'cancelled'; }",
                  run, timeout=90_000)
    assert page.train_state()["points"] == state["points"]

    # a run the node refuses before its first epoch (images_per_epoch not a multiple of batch_size): failed
    bad = training_workflow(f"web_fail_{uuid.uuid4().hex[:8]}", epochs=2, images_per_epoch=5)
    page.evaluate(LOAD_AND_SET, bad)
    queue(page)
    page.wait_for("() => app.graph._nodes.find(n => n.type === 'TexForceTrain').texforceState().status === 'failed'")
    state = page.train_state()
    assert state["text"].startswith("failed: ") and "images_per_epoch" in state["text"], state["text"]
    page.screenshot("web_training_failed", "TexForceTrain")
    page.assert_no_js_errors()


SCORE_GRAPH = """async () => {
    const g = app.graph;
    g.clear();
    const add = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; g.add(n); return n; };
    const set = (n, values) => {
        for (const [k, v] of Object.entries(values)) n.widgets.find(w => w.name === k).value = v;
    };
    const ckpt = add('TexForceTestTinyCheckpoint', 0, 100);
    const pos = add('CLIPTextEncode', 380, 0), neg = add('CLIPTextEncode', 380, 250);
    const latent = add('EmptyLatentImage', 380, 500), sampler = add('KSampler', 860, 100);
    const decode = add('VAEDecode', 1240, 100), reward = add('TexForceJPEGReward', 860, 500);
    const score = add('TexForceScoreImages', 1240, 250), preview = add('PreviewImage', 1720, 100);
    set(pos, {text: 'a photo of a cat'});
    set(latent, {width: 64, height: 64, batch_size: 3});
    set(sampler, {steps: 2, seed: 1, control_after_generate: 'fixed'});
    ckpt.connect(1, pos, 'clip'); ckpt.connect(1, neg, 'clip'); ckpt.connect(0, sampler, 'model');
    pos.connect(0, sampler, 'positive'); neg.connect(0, sampler, 'negative');
    latent.connect(0, sampler, 'latent_image');
    sampler.connect(0, decode, 'samples'); ckpt.connect(2, decode, 'vae');
    decode.connect(0, score, 'images'); reward.connect(0, score, 'reward'); score.connect(3, preview, 'images');
    g.setDirtyCanvas(true, true);
}"""


def test_score_images_shows_its_scores_on_the_node(page):
    page.open()
    page.evaluate(SCORE_GRAPH)
    queue(page)
    text = page.wait_for("""() => {
        const n = app.graph._nodes.find(n => n.type === 'TexForceScoreImages');
        return n.widgets.find(w => w.name === 'texforce_report')?.value || false;
    }""", timeout=120_000)
    assert re.match(r"jpeg\S* ?\S*: mean -?[\d.e+-]+ over 3 images\n", text) or "over 3 images" in text, text
    assert len(text.strip().splitlines()) >= 4  # the summary, a header and a row per image
    # shown on the node only: not saved with the workflow, not sent as an input
    node = page.evaluate("""() => {
        const n = app.graph._nodes.find(n => n.type === 'TexForceScoreImages');
        return {values: n.serialize().widgets_values, count: n.widgets.length};
    }""")
    assert node["values"] == ["", 0]
    page.screenshot("web_score_images", "TexForceScoreImages")
    page.assert_no_js_errors()
