"""Presets, settings validation (training/config.py) and checkpoint files (training/checkpoint.py)."""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

import pytest
import torch

import conftest  # noqa: F401
from texforce_pack.training import checkpoint as ckpt
from texforce_pack.training.config import (PRESETS, ConfigError, TrainConfig, config_from_dict, config_to_dict,
                                           make_config, optimizer_steps_per_epoch, train_timesteps, validate)


def test_presets_carry_the_reference_values():
    tf = make_config("texforce")
    assert (tf.lora_rank, tf.lora_alpha, tf.lr, tf.guidance, tf.timestep_fraction) == (16, 16.0, 3e-4, 5.0, 0.5)
    assert (tf.num_steps, tf.eta, tf.kl_weight, tf.clip_range, tf.adv_clip_max) == (50, 1.0, 0.0, 1e-4, 5.0)
    assert (tf.weight_decay, tf.max_grad_norm, tf.lr_schedule, tf.loss) == (1e-4, 1.0, "cosine", "ppo")
    assert tf.warmup_fraction > 0
    dd = make_config("ddpo")
    assert (dd.timestep_fraction, dd.advantage, dd.stat_buffer_size, dd.stat_min_count) == (1.0, "per_prompt", 16, 16)
    dp = make_config("dpok")
    assert 0.01 <= dp.kl_weight <= 0.1
    for name in PRESETS:
        cfg = make_config(name)
        assert cfg.preset == name
        validate(cfg)  # every preset is a valid configuration as shipped
    assert train_timesteps(tf) == 25 and optimizer_steps_per_epoch(tf) == 2


def test_overrides_and_unknown_fields():
    cfg = make_config("ddpo", lr=1e-3, num_steps=20.0, guidance=7)
    assert cfg.lr == 1e-3 and cfg.num_steps == 20 and cfg.guidance == 7.0 and cfg.timestep_fraction == 1.0
    with pytest.raises(ConfigError) as e:
        make_config("texforce", learning_rate=1e-3)
    assert "learning_rate" in str(e.value) and "lr" in str(e.value) and "timestep_fraction" in str(e.value)
    with pytest.raises(ConfigError, match="unknown preset 'grpo'"):
        make_config("grpo")
    with pytest.raises(ConfigError, match="num_steps must be a int"):
        make_config("texforce", num_steps="fifty")
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"eta": 0.0}, "eta = 0.0: the DDIM step needs noise"),
    ({"eta": 1.5}, "use eta in (0, 1]"),
    ({"images_per_epoch": 30}, "not a multiple of sample_batch_size = 8; use 32 images"),
    ({"images_per_epoch": 24, "sample_batch_size": 4, "images_per_prompt": 3, "train_batch_size": 2,
      "gradient_accumulation_steps": 8}, "not a multiple of train_batch_size × gradient_accumulation_steps = 2 × 8 = 16"),
    ({"images_per_prompt": 3}, "not a multiple of images_per_prompt = 3"),
    ({"num_steps": 1000}, "num_steps = 1000 is more than the model's 1000-step schedule allows (999)"),
    ({"num_steps": 10, "timestep_fraction": 0.01}, "trains 0 timesteps"),
    ({"timestep_fraction": 1.5}, "timestep_fraction = 1.5 must be in (0, 1]"),
    ({"advantage": "group", "images_per_prompt": 1}, "set images_per_prompt ≥ 2"),
    ({"stat_min_count": 64}, "no prompt could ever use its own statistics"),
    ({"height": 500}, "height = 500 must be a positive multiple of 8"),
    ({"loss": "dpo"}, "loss 'dpo' is not one of ppo, sf"),
    ({"clip_range": 0.0}, "clip_range = 0.0 must be > 0"),
    ({"train_batch_size": 0}, "train_batch_size must be at least 1"),
])
def test_validation_says_what_to_change(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(make_config("texforce", **overrides))
    assert message in str(e.value)


def test_validation_reports_every_problem_at_once_and_warns_about_multi_step_sf(caplog):
    with pytest.raises(ConfigError) as e:
        validate(make_config("texforce", eta=0.0, num_steps=5000, images_per_epoch=30))
    text = str(e.value)
    assert "eta" in text and "num_steps" in text and "images_per_epoch = 30" in text
    with caplog.at_level(logging.WARNING):
        warnings = validate(make_config("texforce", loss="sf"))
    assert warnings and "only unbiased for the first optimizer step" in warnings[0]
    assert validate(make_config("texforce", loss="sf", gradient_accumulation_steps=16)) == []
    with pytest.raises(ConfigError, match="allows \\(19\\)"):
        validate(make_config("texforce", num_steps=20), schedule_length=20)


def _state(cfg: TrainConfig, value: float = 1.0) -> dict:
    return {"epoch": 3, "lora_state": {"w": torch.full((2, 2), value)}, "config": config_to_dict(cfg),
            "history": [{"epoch": 1, "reward_mean": 0.5}], "rng": {"sample": torch.Generator().get_state()}}


def test_checkpoint_round_trip_and_atomic_replace(tmp_path, monkeypatch):
    path = tmp_path / "run" / "state.pt"
    cfg = make_config("texforce")
    ckpt.save_checkpoint(path, _state(cfg, 1.0))
    loaded = ckpt.load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["lora_state"]["w"], torch.ones(2, 2))
    assert loaded["history"] == [{"epoch": 1, "reward_mean": 0.5}]

    # a crash in the middle of writing the next one leaves the previous file intact and no temp files
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, _state(cfg, 2.0))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert os.listdir(path.parent) == ["state.pt"]
    assert torch.equal(ckpt.load_checkpoint(path)["lora_state"]["w"], torch.ones(2, 2))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "epoch": _Payload(str(marker))}, evil)
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
        ckpt.load_checkpoint(evil)
    assert not marker.exists()
    other = tmp_path / "other.pt"
    torch.save({"just": torch.ones(1)}, other)
    with pytest.raises(ckpt.CheckpointError, match="not a TexForce training checkpoint"):
        ckpt.load_checkpoint(other)
    (tmp_path / "trunc.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(ckpt.CheckpointError, match="no training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_config_mismatch_on_resume(caplog):
    saved = config_to_dict(make_config("texforce"))
    assert ckpt.check_config(saved, make_config("texforce")) == []
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_config(saved, make_config("texforce", lr=1e-3, lora_rank=8))
    assert "lr: 0.0003 in the checkpoint, now 0.001" in str(e.value) and "lora_rank" in str(e.value)
    assert "start a new run" in str(e.value)
    with caplog.at_level(logging.WARNING):
        warnings = ckpt.check_config(saved, dataclasses.replace(make_config("texforce"), sample_batch_size=4,
                                                                epochs=200))
    assert len(warnings) == 2 and "sample_batch_size" in caplog.text
