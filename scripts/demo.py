"""The one-command demo: a real ComfyUI with this pack makes the embedded toy text-to-image model better.

    make demo [ARGS="--epochs N"]   # or: python3 scripts/demo.py [--epochs N] [--port P]
    make demo-stop                  # or: python3 scripts/demo.py --stop

It starts ComfyUI (the cached environment of scripts/comfy_host.py) with this pack and runs one workflow
headless through /prompt: the embedded toy checkpoint (a small pretrained model of coloured shapes that ships
with the pack), TexForce Train against the toy alignment reward on its 72 training prompts, then TexForce
Compare on the 24 held-out prompt combinations (same noise with and without the LoRA). It prints each epoch,
the change in alignment with its standard error, and where the LoRA, the before/after grid and the reward
curve are. With a real checkpoint, the same workflow runs with "Load Checkpoint" and a real reward.

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
sys.path.insert(0, str(REPO / "tests"))  # the client helper lives there
sys.path.insert(0, str(REPO))
from comfy_server import ComfyClient, comfy_host, start_test_server  # noqa: E402  (stdlib only)

log = logging.getLogger("texforce.demo")
STATE_FILE = "demo_server.json"  # in the base directory: the server this demo left running
EVAL_SEED = 1234
# TexForce Train on the toy with the `fast` preset's values: 20 steps, 128 images per epoch (16 prompts × 8,
# group_mean advantages), branch sampling at one step with reward-weighted regression (sde_steps 1, loss rwr),
# batches of 32 (4 optimizer steps per epoch), learning rate 1e-3, LoRA rank 16 (README: "What training does
# to a pretrained model")
TRAIN = {"preset": "fast", "images_per_epoch": 128, "images_per_prompt": 8, "batch_size": 32, "width": 0, "height": 0,
         "steps": 20, "guidance": 5.0, "eta": 1.0, "learning_rate": 1e-3, "lora_rank": 16, "kl_weight": -1.0,
         "advantage": "preset", "seed": 0, "resume": True, "optimizer_steps": 0, "text_encoders": "all",
         "sde_steps": -1}


def parse_override(text: str) -> tuple[str, object]:
    """`name=value` for one TexForce Train input; the value keeps the type of the demo's default."""
    name, sep, value = text.partition("=")
    if not sep or name not in TRAIN:
        raise argparse.ArgumentTypeError(f"{text!r}: expected INPUT=VALUE with INPUT one of {', '.join(sorted(TRAIN))}")
    kind = type(TRAIN[name])
    try:
        return name, (value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {name} takes a {kind.__name__}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=32, help="training epochs (about 20 s each on 2 CPU cores)")
    parser.add_argument("--images-per-prompt", type=int, default=None,
                        help="noises per held-out prompt in the before/after comparison (default: 16 for the 24 "
                             "prompts, 4 for the 168 rephrased ones)")
    parser.add_argument("--phrasing", choices=("prompt", "rephrased"), default="rephrased",
                        help="the toy's prompts as it learned them (it already follows them: little to gain) or the "
                             "same scenes written other ways (TexForce Toy Checkpoint's phrasing)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the comparison's noise stays fixed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="INPUT=VALUE",
                        type=parse_override,
                        help="override one TexForce Train input, e.g. --set learning_rate=2e-3 --set "
                             "images_per_prompt=4 (repeatable; names as in the node)")
    parser.add_argument("--result", type=Path, default=None,
                        help="also write the numbers (comparison, reward per epoch, seconds) to this JSON file")
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
    server = start_test_server(base, [], port=port, owned=False)
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

from comfy_server import RunProgress  # noqa: E402

def workflow(name: str, epochs: int, images_per_prompt: int, seed: int = 0, phrasing: str = "prompt",
             overrides: dict | None = None) -> dict:
    """Train on the toy's training prompts, then compare the CLIP before and after on its held-out combinations."""
    return {
        "toy": {"class_type": "TexForceToyCheckpoint", "inputs": {"phrasing": phrasing}},
        "reward": {"class_type": "TexForceToyAlignmentReward", "inputs": {"mode": "soft"}},
        "train": {"class_type": "TexForceTrain", "inputs": {
            **TRAIN, "model": ["toy", 0], "clip": ["toy", 1], "vae": ["toy", 2], "reward": ["reward", 0],
            "prompts": ["toy", 3], "epochs": epochs, "lora_name": name, "seed": seed, **(overrides or {})}},
        "compare": {"class_type": "TexForceCompare", "inputs": {
            "model": ["toy", 0], "clip_before": ["toy", 1], "clip_after": ["train", 0], "vae": ["toy", 2],
            "reward": ["reward", 0], "prompts": ["toy", 4], "images_per_prompt": images_per_prompt, "seed": EVAL_SEED,
            "steps": 20, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "ddim_uniform", "width": 0, "height": 0,
            "grid_columns": 8}},
        "grid": {"class_type": "SaveImage", "inputs": {"images": ["compare", 1], "filename_prefix": f"{name}/before_after"}},
        "curve": {"class_type": "SaveImage", "inputs": {"images": ["train", 2], "filename_prefix": f"{name}/curve"}},
    }


def saved(base: Path, out: dict, node: str) -> Path:
    image = out[node]["images"][0]
    return base / "output" / image["subfolder"] / image["filename"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.stop:
        return stop_demo(args.base)
    name = f"demo_{time.strftime('%Y%m%d_%H%M%S')}"
    server = start_demo_server(args.base, args.port)
    client = ComfyClient(server.url)
    held_out = 24 if args.phrasing == "prompt" else 168
    images_per_prompt = args.images_per_prompt or (16 if args.phrasing == "prompt" else 4)
    try:
        t0 = time.time()
        log.info("training %s on the embedded toy model for %d epochs (toy alignment reward, preset fast; about "
                 "20 s an epoch on 2 CPU cores), then comparing before/after on %d held-out prompts × %d noises ...",
                 name, args.epochs, held_out, images_per_prompt)
        entry = client.run(workflow(name, args.epochs, images_per_prompt, args.seed, args.phrasing,
                                    dict(args.overrides)), timeout=3600,
                           progress=RunProgress(client, name))
        seconds = time.time() - t0
        out = entry["outputs"]
        result = out["compare"]["texforce_compare"][0]
        history = [json.loads(line) for line in
                   (args.base / "output" / "texforce" / name / "history.jsonl").read_text().splitlines()]
        lora = args.base / "models" / "loras" / "texforce" / f"{name}.safetensors"
        log.info("\n== TexForce demo finished in %.0f s", seconds)
        log.info("LoRA:          %s", lora)
        log.info("before/after:  %s  (top: the toy model as shipped, bottom: with the trained LoRA; same noise; "
                 "prompts the LoRA never trained on)", saved(args.base, out, "grid"))
        log.info("reward curve:  %s", saved(args.base, out, "curve"))
        log.info("training reward (alignment, 0..1), epoch 1 → %d: %.3f → %.3f", len(history),
                 history[0]["reward_mean"], history[-1]["reward_mean"])
        log.info("held-out prompts (%d × %d images, ComfyUI's DDIM sampler, fixed noise): alignment %.3f → %.3f, "
                 "change %+.3f ± %.3f (%.1f standard errors)", result["prompts"], result["images_per_prompt"],
                 result["before"], result["after"], result["diff"], result["se"], result["z"])
        if args.result:
            args.result.parent.mkdir(parents=True, exist_ok=True)
            args.result.write_text(json.dumps({"seed": args.seed, "epochs": args.epochs, "phrasing": args.phrasing,
                                               "overrides": dict(args.overrides),
                                               "seconds": round(seconds, 1),
                                               "held_out": result, "reward_per_epoch": [h["reward_mean"] for h in history]},
                                              indent=1))
        log.info("\nComfyUI is still running at %s (pid %d); open it to see the workflow's nodes; stop it with: "
                 "make demo-stop  (or python3 scripts/demo.py --stop)", server.url, server.pid)
        return 0
    except BaseException:
        log.error("\nthe demo did not finish; ComfyUI is still running at %s (pid %d, log %s); stop it with: "
                  "make demo-stop", server.url, server.pid, server.log_path)
        raise


if __name__ == "__main__":
    sys.exit(main())
