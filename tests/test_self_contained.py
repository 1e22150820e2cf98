"""The test suite needs nothing outside this repository: the published files it reads are in tests/data/.

.ci/run also runs the whole suite from a copy of the checkout that has no folder beside it, which is the
proof that no test reads one; these tests check the shipped fixtures themselves.
"""
from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from conftest import REPO
from lora_builders import RELEASE_CONFIGS
from reward_builders import AESTHETIC_HEAD_FILE

from texforce_pack.training.lora import read_lora

AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
RELEASES = ("sd15_texforce", "sd21_texforce", "sdturbo_qinstruct_texforce")
# a path that climbs out of the repository into a sibling data folder (written so it does not match itself)
OUTSIDE = re.compile(r"\.\./" + r"shared|parents\[2\]|REPO(?:_ROOT)?\.parent\b|['\"]" + r"shared['\"]\s*/")


def test_the_aesthetic_head_is_the_published_file_with_its_licences():
    assert AESTHETIC_HEAD_FILE.is_relative_to(REPO / "tests" / "data")
    assert hashlib.sha256(AESTHETIC_HEAD_FILE.read_bytes()).hexdigest() == AESTHETIC_SHA256
    state = torch.load(AESTHETIC_HEAD_FILE, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64),
        "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    folder = AESTHETIC_HEAD_FILE.parent
    assert "MIT License" in (folder / "LICENSE.ddpo-pytorch").read_text()
    assert "Apache License" in (folder / "LICENSE.improved-aesthetic-predictor").read_text()
    readme = (REPO / "tests" / "data" / "README.md").read_text()
    assert "kvablack/ddpo-pytorch" in readme and "improved-aesthetic-predictor" in readme and AESTHETIC_SHA256 in readme


@pytest.mark.parametrize("release", RELEASES)
def test_the_release_configs_give_the_released_scale(tmp_path, release):
    """Each official release's adapter_config.json, beside an adapter_model.bin of the release's key layout."""
    config = json.loads((RELEASE_CONFIGS / release / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 16, 16)
    assert sorted(config["target_modules"]) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    folder = tmp_path / release
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    path = "text_model.encoder.layers.0.self_attn.q_proj"
    torch.save({f"base_model.model.{path}.lora_A.weight": torch.ones(16, 8),
                f"base_model.model.{path}.lora_B.weight": torch.ones(8, 16)}, folder / "adapter_model.bin")
    lora = read_lora(folder)
    assert list(lora.modules) == [("te", path)] and lora.modules[("te", path)].alpha == 16
    assert lora.notes == ["scale from adapter_config.json: lora_alpha 16 / r 16"]


def test_no_file_of_the_repository_reads_a_folder_beside_it():
    skip = {".git", "__pycache__", ".pytest_cache", "artifacts", "demo_output"}
    texts = [f for f in REPO.rglob("*") if f.is_file() and not skip & set(f.relative_to(REPO).parts)
             and (f.suffix in (".py", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".json")
                  or f.name in ("Makefile", "run"))]
    assert REPO / "tests" / "conftest.py" in texts and REPO / ".ci" / "run" in texts
    offenders = [f"{f.relative_to(REPO)}:{n}: {line.strip()}" for f in texts
                 for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert offenders == []
