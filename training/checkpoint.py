"""Resumable training checkpoints: written atomically, read without executing code.

A checkpoint is one `torch.save` file holding only tensors and plain containers:
    {"format", "version", "epoch", "lora_state", "optimizer", "scheduler", "stat_tracker",
     "rng": {name: ByteTensor}, "config": dict, "history": [dict per epoch], "prompts_sha256",
     "model": {"family", "encoders"} or None, "reward_state" (a reward mix's running statistics, if any)}
It is written to a temporary file in the same folder and moved over the old one with os.replace, so a
crash or Ctrl-C during the write leaves the previous epoch's checkpoint intact. It is read only with
`torch.load(..., weights_only=True)`: a file that tries to run code on load is refused.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, config_to_dict
from .lora.family import encoders_label, family_label

log = logging.getLogger(__name__)

FORMAT = "texforce-training-checkpoint"
VERSION = 1

# Fields that may differ on resume without changing what the run computes (sample_batch_size and
# encode_once_per_microbatch do not change the math; epochs only moves the cosine horizon; seed is
# overridden by the saved generator states). Everything else must match exactly.
HARMLESS_FIELDS = frozenset({"preset", "epochs", "seed", "sample_batch_size", "encode_once_per_microbatch"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def clone_cpu(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples of tensors onto the CPU: snapshots and checkpoints must not alias
    live state (the optimizer would otherwise mutate a restored snapshot in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: clone_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_cpu(v) for v in obj)
    return obj


def model_identity(host: object) -> dict[str, Any] | None:
    """The family and trained encoders of a host's model, when the host says (both real hosts do)."""
    family, encoders = getattr(host, "family", None), getattr(host, "encoders", None)
    return {"family": family, "encoders": sorted(encoders)} if family and encoders else None


def check_model(saved: dict[str, Any] | None, here: dict[str, Any] | None, path: str | os.PathLike) -> None:
    """Refuse to resume a checkpoint of another model family or another choice of trained encoders: its LoRA
    would not fit this model, or part of it would be silently dropped."""
    if saved and here and saved != here:
        def label(m: dict) -> str:
            return f"{encoders_label(m['encoders'])} of {family_label(m['family'], m['family'])}"
        raise CheckpointError(f"cannot resume {path}: it trained the {label(saved)}, but this run trains the "
                              f"{label(here)}. Use the model and text-encoder choice it was trained with, or "
                              "start a new run (another name / output folder, or resume off).")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` atomically: temp file in the same directory, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with weights_only=True; refuse anything else with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path} cannot be loaded safely as a training checkpoint (it is corrupt, truncated, or contains "
            f"objects that would run code on load, which is refused): {str(e).splitlines()[0][:300]}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a TexForce training checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {state.get('version')}; this version reads {VERSION}")
    return state


def check_config(saved: dict[str, Any], cfg: TrainConfig, source: str = "checkpoint") -> list[str]:
    """Compare a checkpoint's config with the one resuming it.

    Differences in fields that change the math raise CheckpointError naming each field and both values;
    harmless differences are returned (and logged) as warnings.
    """
    current = config_to_dict(cfg)
    math_diffs, harmless = [], []
    for name, value in current.items():
        if name not in saved:
            if name not in HARMLESS_FIELDS:
                math_diffs.append(f"{name}: not in the {source}, now {value!r}")
            continue
        if saved[name] != value:
            (harmless if name in HARMLESS_FIELDS else math_diffs).append(
                f"{name}: {saved[name]!r} in the {source}, now {value!r}")
    if math_diffs:
        raise CheckpointError(
            f"cannot resume: the {source} was trained with different settings that change the result:\n- "
            + "\n- ".join(math_diffs)
            + "\nSet them back to the checkpoint's values to resume, or start a new run (turn resume off).")
    warnings = [f"resuming with a different {d}" for d in harmless]
    for w in warnings:
        log.warning(w)
    return warnings
