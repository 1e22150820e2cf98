"""The headless trainer: one run from a YAML config (and/or flags) on a diffusers pipeline.

    python train.py --config run.yaml
    torchrun --nproc_per_node 2 train.py --config run.yaml
    accelerate launch --num_processes 2 train.py --config run.yaml

The run folder (`output`) gets the LoRA as `<name>.safetensors` (the kohya file the ComfyUI node writes),
`checkpoint.pt` (resume state, written after every finished epoch by rank 0), `history.jsonl` (one line of
stats per epoch) and `run.yaml` (the resolved settings). Running the same command again resumes.
The reward is built by a factory the caller passes (train.py passes rewards.registry.build_rewards), so
this module depends on the training core only.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ConfigError, config_to_dict, make_config
from .distributed import ProcessGroup, SingleProcess, device_for, init_from_env
from .lora.family import native_size
from .loop import TrainingCancelled
from .run import RunFiles, TrainingRun

log = logging.getLogger("texforce.train")

RewardFactory = Callable[..., Any]  # (specs, base_dir=, device=, normalize=) -> reward
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RUN_KEYS = {"model", "model_config", "prompts", "output", "name", "preset", "reward", "normalize_rewards",
            "train", "encoders", "device", "dtype", "resume", "backend"}


class SettingsError(ValueError):
    """A config file or flag that cannot work; the message names it and says what to write instead."""


@dataclass
class RunSettings:
    model: str
    prompts: str
    output: str
    reward: list[dict[str, Any]]
    model_config: str | None = None
    name: str = "texforce_lora"
    preset: str = "texforce"
    normalize_rewards: bool = True
    train: dict[str, Any] = field(default_factory=dict)
    encoders: list[str] | None = None
    device: str = "auto"
    dtype: str = "float32"
    resume: bool = True
    backend: str | None = None
    base_dir: Path = Path(".")

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="Train a text-encoder LoRA with DDPO (TexForce) on a "
                                "diffusers Stable Diffusion (1.x, 2.x, XL, 3.x) or Flux model; under "
                                "torchrun/accelerate for several GPUs.")
    p.add_argument("--config", help="run.yaml: any of the settings below, plus `train:` (training settings) and "
                   "`reward:` (a list of {kind, path, weight, ...}). Flags override it.")
    p.add_argument("--model", help="diffusers folder, or a single-file .safetensors checkpoint")
    p.add_argument("--model-config", dest="model_config",
                   help="diffusers folder (or hub id) with the single file's architecture; needed offline")
    p.add_argument("--prompts", help="prompt file: one prompt per line, or JSON lines with a 'prompt' field")
    p.add_argument("--output", help="run folder (LoRA, checkpoint, history)")
    p.add_argument("--name", help="LoRA file name (without .safetensors)")
    p.add_argument("--preset", help="texforce, ddpo or dpok")
    p.add_argument("--reward", action="append", metavar="KIND[:WEIGHT]",
                   help="a reward without weights files (e.g. jpeg_compressibility); repeat to mix")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting, e.g. --set epochs=20 --set lr=1e-4 (see training/config.py)")
    p.add_argument("--encoders", help="comma-separated encoders to train (clip_l, clip_g, clip_h, t5xxl); default all")
    p.add_argument("--device", help="auto (each rank's GPU, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights of the frozen model (LoRA and log-probs stay fp32)")
    p.add_argument("--backend", choices=["gloo", "nccl"], help="distributed backend (default nccl on GPUs, else gloo)")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="refuse to continue an existing run in --output instead of resuming it")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace) -> RunSettings:
    """The config file's values, overridden by flags; relative paths are relative to the config file."""
    values: dict[str, Any] = {}
    base = Path(".")
    if args.config:
        import yaml

        cfg_path = Path(args.config)
        if not cfg_path.is_file():
            raise SettingsError(f"config file {cfg_path} does not exist")
        try:
            values = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise SettingsError(f"{cfg_path} is not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise SettingsError(f"{cfg_path} must be a mapping of settings, got {type(values).__name__}")
        unknown = sorted(set(values) - RUN_KEYS)
        if unknown:
            raise SettingsError(f"{cfg_path}: unknown setting(s) {', '.join(unknown)}; valid are {', '.join(sorted(RUN_KEYS))}")
        base = cfg_path.resolve().parent
    for key in ("model", "model_config", "prompts", "output", "name", "preset", "device", "dtype", "resume", "backend"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if args.encoders:
        values["encoders"] = [e.strip() for e in args.encoders.split(",") if e.strip()]
    if args.reward:
        values["reward"] = []
        for item in args.reward:
            kind, _, weight = item.partition(":")
            values["reward"].append({"kind": kind, **({"weight": float(weight)} if weight else {})})
    train = dict(values.get("train") or {})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SettingsError(f"--set {item!r}: write KEY=VALUE, e.g. --set epochs=20")
        train[key.strip()] = yaml_scalar(value.strip())
    values["train"] = train
    missing = [k for k in ("model", "prompts", "output", "reward") if not values.get(k)]
    if missing:
        raise SettingsError(f"missing setting(s): {', '.join(missing)} (in --config or as flags)")
    reward = values["reward"]
    values["reward"] = [reward] if isinstance(reward, dict) else list(reward)
    if values.get("dtype", "float32") not in DTYPES:
        raise SettingsError(f"dtype {values['dtype']!r}: choose one of {', '.join(DTYPES)}")
    return RunSettings(**values, base_dir=base)


def yaml_scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (blank lines and lines starting with # skipped), or JSON lines {"prompt": ...}."""
    if not path.is_file():
        raise SettingsError(f"prompt file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl" or line.startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise SettingsError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise SettingsError(f"{path}:{n}: a JSON line needs a string field 'prompt'")
            line = item["prompt"].strip()
        if line:
            prompts.append(line)
    if not prompts:
        raise SettingsError(f"{path} has no prompts")
    return prompts


def run(settings: RunSettings, reward_factory: RewardFactory, dist: SingleProcess | ProcessGroup) -> list[dict]:
    """Load, train, save; returns the run's history. Every rank calls it; rank 0 writes the files."""
    from .hosts.diffusers import DiffusersHost, load_pipeline

    cfg = _config(settings)
    out = settings.path(settings.output)
    files = RunFiles(lora=out / f"{settings.name}.safetensors", folder=out)
    if Path(settings.name).name != settings.name or settings.name in ("", ".", ".."):
        raise SettingsError(f"name {settings.name!r} must be a plain file name, without folders")
    if not settings.resume and files.checkpoint.exists():
        raise SettingsError(f"{out} already holds a run (checkpoint.pt); resume it (drop --no-resume) or choose "
                            "another --output")
    prompts = read_prompts(settings.path(settings.prompts))
    device = device_for(dist, settings.device)
    model_config = settings.model_config
    if model_config and settings.path(model_config).exists():
        model_config = str(settings.path(model_config))
    pipe = load_pipeline(settings.path(settings.model), model_config, DTYPES[settings.dtype], device)
    host = DiffusersHost(pipe, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed, encoders=settings.encoders,
                         device=device)
    if "height" not in settings.train and "width" not in settings.train:  # the family's native size
        size = native_size(host.family, host.prediction_type == "v_prediction")
        cfg = _config(settings, height=size, width=size)
    reward = reward_factory(settings.reward, base_dir=settings.base_dir, device=device,
                            normalize=settings.normalize_rewards)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        resolved = {k: v for k, v in vars(settings).items() if k != "base_dir"}
        (out / "run.yaml").write_text(yaml.safe_dump({**resolved, "train": config_to_dict(cfg)}, sort_keys=False))
    dist.barrier()  # nobody reads the run folder before rank 0 made it

    bar = _progress(cfg.epochs, dist)

    def on_epoch(stats) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{stats.reward_mean:.4g}", kl=f"{stats.approx_kl:.2g}")

    job = TrainingRun(host, reward, prompts, cfg, files, name=settings.name, resume=settings.resume, dist=dist,
                      metadata={"trainer": "headless", "processes": dist.world_size}, on_epoch=on_epoch)
    if bar is not None:
        bar.update(job.epoch)
    t0 = time.time()
    try:
        history = job.run()
    finally:
        if bar is not None:
            bar.close()
    if dist.is_main:
        log.info("done: %d epochs in %.1fs; LoRA %s", job.epoch, time.time() - t0, files.lora)
    return history


def _config(settings: RunSettings, **defaults: Any):
    try:
        return make_config(settings.preset, **{**defaults, **settings.train})
    except ConfigError as e:
        raise SettingsError(f"train: {e}") from e


def _progress(total: int, dist):
    if not dist.is_main:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="epochs", unit="epoch", dynamic_ncols=True, file=sys.stderr)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, reward_factory: RewardFactory | None = None) -> int:
    """Exit status: 0 done, 1 error (the message says what to do), 130 interrupted (run the same command
    again to resume from the last finished epoch)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if reward_factory is None:
        raise ValueError("main() needs a reward_factory (train.py passes rewards.registry.build_rewards)")
    # torchrun and accelerate stop workers with SIGTERM: treat it like Ctrl-C (last finished epoch kept)
    signal.signal(signal.SIGTERM, _interrupt)
    dist = init_from_env(getattr(args, "backend", None))
    prefix = f"rank {dist.rank}: " if dist.world_size > 1 else ""
    try:
        settings = load_settings(args)
        run(settings, reward_factory, dist)
        dist.barrier()
        return 0
    except (KeyboardInterrupt, TrainingCancelled):
        log.error("%sinterrupted; the last finished epoch is saved: run the same command to resume", prefix)
        return 130
    except Exception as e:  # one clear line per rank; peers waiting on this rank fail in their next exchange
        log.error("%s%s: %s", prefix, type(e).__name__, e, exc_info=args.verbose)
        return 1
    finally:
        dist.close()

