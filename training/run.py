"""One training job, the same for the TexForce Train node and the headless CLI.

Given a host, a reward, prompts and settings, a run: resumes from its checkpoint, trains, and after every
finished epoch writes the LoRA (kohya, with the run's metadata) and history.jsonl, then calls the caller's
hook (progress bars, browser events). Both files are written atomically (temp file + rename), so a crash or a
cancel leaves them at a finished epoch, in step with the checkpoint. What differs between callers stays with
them: how the models are loaded, where the files go, refusing an existing run before loading, progress.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .checkpoint import prompts_digest
from .config import TrainConfig, config_to_dict
from .host import Host
from .lora import LoraFileError, save_kohya
from .lora.family import ENCODER_LABELS, family_label
from .lora.keys import parse_state_dict
from .lora.read import read_metadata
from .loop import Trainer
from .reward import Reward
from .stats import EpochStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFiles:
    """Where a run's files go: its LoRA file, and a folder for checkpoint.pt and history.jsonl."""

    lora: Path
    folder: Path

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.pt"

    @property
    def history(self) -> Path:
        return self.folder / "history.jsonl"


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """history.jsonl, one line per finished epoch, rewritten whole and atomically: it always matches the
    checkpoint it was written with, even after a crash between the two."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    os.replace(tmp, path)


def check_resume_layout(lora_path: Path, run: str, family: str | None, encoders: list[str]) -> None:
    """Refuse to resume a run trained on another model family or another choice of text encoders.

    The run's LoRA file records both (texforce.family, texforce.encoders); resuming across them would load a
    LoRA of other shapes into this model, or drop the part of it this setting does not train."""
    if not lora_path.is_file():
        return
    meta = read_metadata(lora_path)
    was_family = meta.get("texforce.family")
    if was_family and family and was_family != family:
        raise LoraFileError(
            f"run {run!r} was trained on {family_label(was_family)} ({lora_path.name}), but this CLIP is "
            f"{family_label(family)}: resume it with the checkpoint it was trained on, or choose another lora_name.")
    was = [e for e in meta.get("texforce.encoders", "").split(",") if e]
    if was and sorted(was) != sorted(encoders):
        names = " + ".join(ENCODER_LABELS.get(e, e) for e in sorted(was))
        raise LoraFileError(
            f"run {run!r} trained {names} ({lora_path.name}); this setting trains "
            f"{' + '.join(ENCODER_LABELS.get(e, e) for e in sorted(encoders))}. Set text_encoders as the run was "
            "started, or choose another lora_name.")


class TrainingRun:
    """A Trainer wired to a run's files. Building it resumes (when asked) and validates the settings; `run`
    trains. Every process of a distributed run builds one; only the main process writes files."""

    def __init__(self, host: Host, reward: Reward, prompts: list[str], cfg: TrainConfig, files: RunFiles, *,
                 name: str, resume: bool = True, metadata: dict[str, Any] | None = None, dist=None,
                 should_stop: Callable[[], bool] | None = None,
                 on_epoch: Callable[[EpochStats], None] | None = None) -> None:
        self.host, self.files, self.name = host, files, name
        self._on_epoch = on_epoch
        if resume:
            check_resume_layout(files.lora, name, host.family, host.encoders)
        self.metadata: dict[str, Any] = {
            "preset": cfg.preset, "reward": getattr(reward, "name", type(reward).__name__),
            "encoders": ",".join(host.encoders), "width": cfg.width, "height": cfg.height,
            "prompts_sha256": prompts_digest(prompts), "num_steps": cfg.num_steps, "guidance": cfg.guidance,
            "config": json.dumps(config_to_dict(cfg)), **(metadata or {})}
        self.trainer = Trainer(host, reward, prompts, cfg, checkpoint_path=files.checkpoint,
                               on_epoch=self._finished, should_stop=should_stop, resume=resume, dist=dist)
        self.is_main = self.trainer.dist.is_main
        if self.is_main:
            files.folder.mkdir(parents=True, exist_ok=True)

    @property
    def epoch(self) -> int:
        """The last finished epoch (after a cancel too: the trainer goes back to it)."""
        return self.trainer.epoch

    def save_lora(self) -> Path:
        """The LoRA as it is now, with the run's metadata and the finished epoch."""
        lora = parse_state_dict(self.host.lora_state(), source=self.name)
        return save_kohya(lora, self.files.lora, family=self.host.family,
                          metadata={**self.metadata, "epoch": self.trainer.epoch})

    def _finished(self, stats: EpochStats) -> None:
        if self.is_main:
            self.save_lora()
            write_history(self.files.history, self.trainer.history)
        if self._on_epoch is not None:
            self._on_epoch(stats)

    def run(self, epochs: int | None = None) -> list[dict[str, Any]]:
        """Train up to `epochs` finished epochs (default cfg.epochs); return the run's whole history."""
        self.trainer.run(epochs)
        if self.is_main and not self.files.lora.exists():  # the run was already complete: write its LoRA once
            self.save_lora()
        return self.trainer.history
