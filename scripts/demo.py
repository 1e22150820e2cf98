"""The one-command demo: a real ComfyUI with this pack trains a text-encoder LoRA on a tiny embedded model.

    make demo [ARGS="--epochs N"]   # or: python3 scripts/demo.py [--epochs N] [--port P]
    make demo-stop                  # or: python3 scripts/demo.py --stop

It starts ComfyUI (the cached environment of scripts/comfy_host.py) with this pack and the tiny model
the project builds itself (tests/comfy_nodes: a v-prediction SD1-style model whose prompt controls the
image), runs the training workflow headless through /prompt against DDPO's JPEG compressibility reward,
renders before/after images from the same seeds, and prints where everything is and the reward before
and after. With a GPU and a real checkpoint, the same workflow runs with your model by swapping the
tiny-checkpoint node for "Load Checkpoint".

The server is left running (its URL, pid and log are printed) and recorded in <base>/demo_server.json;
`--stop` stops that server, and a new demo stops it before starting its own. Any python3 can run this
script: without torch it re-runs itself with the cached environment's python (building it the first time).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the client helper and the test-only tiny-model node live there
sys.path.insert(0, str(REPO))
from comfy_server import ComfyClient, comfy_host, start_test_server  # noqa: E402  (stdlib only)

log = logging.getLogger("texforce.demo")
STATE_FILE = "demo_server.json"  # in the base directory: the server this demo left running


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (about 1-2 s each on 2 CPU cores)")
    parser.add_argument("--base", type=Path, default=REPO / "demo_output", help="ComfyUI base directory for the demo")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--stop", action="store_true",
                        help="stop the ComfyUI server an earlier demo left running, and exit (needs no torch)")
    return parser.parse_args(argv)


def stop_demo(base: Path) -> int:
    """Stop the server recorded in <base>/demo_server.json, if it is still that demo's ComfyUI."""
    server = comfy_host.stop_recorded(Path(base) / STATE_FILE)
    if server is None:
        log.info("no demo server is running (nothing to stop)")
    else:
        log.info("stopped the demo's ComfyUI (pid %d, %s)", server.pid, server.url)
    return 0


def start_demo_server(base: Path, port: int) -> "comfy_host.Server":
    """Start the demo's ComfyUI (stopping one an earlier demo left running) and record it for --stop."""
    state = Path(base) / STATE_FILE
    old = comfy_host.recorded(state)
    if old is not None:
        log.info("stopping the demo server an earlier run left running (pid %d, %s) ...", old.pid, old.url)
        comfy_host.stop(old.pid)
    state.unlink(missing_ok=True)
    if not comfy_host.is_ready():
        log.info("first run: building the ComfyUI environment (about 3 min, once) ...")
    log.info("starting ComfyUI with TexForce on port %d (about 15 s) ...", port)
    server = start_test_server(base, [REPO / "tests" / "comfy_nodes"], port=port, owned=False)
    comfy_host.write_state(server, state, base)
    log.info("ComfyUI's log (the training's progress goes there too): %s", server.log_path)
    return server


def _run_in_environment() -> None:
    """Run by a python without torch (e.g. `python3 scripts/demo.py`): re-run this script with the cached
    environment's python, building that environment first if needed."""
    if importlib.util.find_spec("torch") is not None:
        return
    if not comfy_host.is_ready():
        log.info("first run: building the ComfyUI environment (about 3 min, once) ...")
    py = str(comfy_host.python_exe())
    os.execv(py, [py, str(Path(__file__).resolve()), *sys.argv[1:]])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _early = parse_args()
    if _early.stop:  # before the imports below: stopping needs no torch
        sys.exit(stop_demo(_early.base))
    _run_in_environment()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rewards.jpeg import jpeg_kilobytes  # noqa: E402

PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car", "a house in the mountains"]
EVAL_SEED = 1234


def workflow(name: str, epochs: int) -> dict:
    """Train, then sample the evaluation prompts with the original and the trained CLIP (same seed)."""
    wf = {
        "ckpt": {"class_type": "TexForceTestTinyCheckpoint",
                 "inputs": {"family": "sd1", "seed": 0, "prompt_controls_image": True}},
        "reward": {"class_type": "TexForceJPEGReward", "inputs": {"mode": "compressibility", "quality": 95}},
        "train": {"class_type": "TexForceTrain", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "reward": ["reward", 0],
            "prompts": "\n".join(PROMPTS), "preset": "texforce", "epochs": epochs, "images_per_epoch": 32,
            "images_per_prompt": 4, "batch_size": 32, "width": 64, "height": 64, "steps": 5, "guidance": 5.0,
            "eta": 1.0, "learning_rate": 1e-2, "lora_rank": 4, "kl_weight": -1.0, "advantage": "batch", "seed": 0,
            "lora_name": name, "resume": True}},
        "curve": {"class_type": "SaveImage", "inputs": {"images": ["train", 2], "filename_prefix": f"{name}/curve"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    for tag, clip in (("before", ["ckpt", 1]), ("after", ["train", 0])):
        neg = f"{tag}_neg"
        wf[neg] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}}
        decoded = []
        for i, prompt in enumerate(PROMPTS):
            pos, smp, dec = f"{tag}_pos{i}", f"{tag}_ks{i}", f"{tag}_dec{i}"
            wf[pos] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": prompt}}
            wf[smp] = {"class_type": "KSampler", "inputs": {
                "model": ["ckpt", 0], "positive": [pos, 0], "negative": [neg, 0], "latent_image": ["empty", 0],
                "seed": EVAL_SEED + i, "steps": 10, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
                "denoise": 1.0}}
            wf[dec] = {"class_type": "VAEDecode", "inputs": {"samples": [smp, 0], "vae": ["ckpt", 2]}}
            decoded.append(dec)
        batch = decoded[0]
        for j, dec in enumerate(decoded[1:]):
            node = f"{tag}_batch{j}"
            wf[node] = {"class_type": "ImageBatch", "inputs": {"image1": [batch, 0], "image2": [dec, 0]}}
            batch = node
        wf[f"{tag}_save"] = {"class_type": "SaveImage", "inputs": {"images": [batch, 0], "filename_prefix": f"{name}/{tag}"}}
    return wf


def load_images(base: Path, images: list[dict]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(base / "output" / im["subfolder"] / im["filename"]).convert("RGB"), dtype=np.float32)
              for im in images]
    return torch.from_numpy(np.stack(arrays) / 255.0)


def side_by_side(before: torch.Tensor, after: torch.Tensor, path: Path) -> Path:
    rows = [np.concatenate(list((x.numpy() * 255).astype(np.uint8)), axis=1) for x in (before, after)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((rows[0].shape[1] * 4, 2 * rows[0].shape[0] * 4),
                                                          Image.NEAREST).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.stop:
        return stop_demo(args.base)
    name = f"demo_{time.strftime('%Y%m%d_%H%M%S')}"
    server = start_demo_server(args.base, args.port)
    client = ComfyClient(server.url)
    try:
        t0 = time.time()
        log.info("training %s for %d epochs against JPEG compressibility ...", name, args.epochs)
        entry = client.run(workflow(name, args.epochs), timeout=3600)
        seconds = time.time() - t0
        out = entry["outputs"]
        before, after = load_images(args.base, out["before_save"]["images"]), load_images(args.base, out["after_save"]["images"])
        kb_before, kb_after = jpeg_kilobytes(before), jpeg_kilobytes(after)
        history = [json.loads(line) for line in
                   (args.base / "output" / "texforce" / name / "history.jsonl").read_text().splitlines()]
        compare = side_by_side(before, after, args.base / "output" / name / "before_after.png")
        curve = args.base / "output" / out["curve"]["images"][0]["subfolder"] / out["curve"]["images"][0]["filename"]
        lora = args.base / "models" / "loras" / "texforce" / f"{name}.safetensors"
        log.info("\n== TexForce demo finished in %.0f s", seconds)
        log.info("LoRA:          %s", lora)
        log.info("before/after:  %s  (top: original CLIP, bottom: trained; same seeds)", compare)
        log.info("reward curve:  %s", curve)
        log.info("training reward (−JPEG kB), epoch 1 → %d: %.3f → %.3f", len(history), history[0]["reward_mean"],
                 history[-1]["reward_mean"])
        log.info("evaluation (fixed seeds, %d prompts): JPEG size %.3f kB → %.3f kB (reward %.3f → %.3f)",
                 len(PROMPTS), kb_before.mean(), kb_after.mean(), -kb_before.mean(), -kb_after.mean())
        log.info("\nComfyUI is still running at %s (pid %d); stop it with: make demo-stop  (or python3 scripts/demo.py "
                 "--stop)", server.url, server.pid)
        return 0
    except BaseException:
        log.error("\nthe demo did not finish; ComfyUI is still running at %s (pid %d, log %s); stop it with: "
                  "make demo-stop", server.url, server.pid, server.log_path)
        raise


if __name__ == "__main__":
    sys.exit(main())
