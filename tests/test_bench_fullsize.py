"""bench/bench_fullsize.py in its --tiny mode (the tests' tiny configs through the same code as the real SD 1.5 and
SDXL): every row measured, finite, with the plan beside it, in the table and in the JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

COLUMNS = ["model", "size", "dtype", "ckpt", "phase", "measured GiB", "plan GiB", "plan/meas", "s/U-Net call"]


def test_tiny_mode_measures_every_row_against_the_plan(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_fullsize.py"), "--tiny", "--device", "cpu", "--models", "sd15",
         "--dtypes", "fp32", "--size", "64", "--process-per", "model", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    head = next(line for line in lines if line.startswith("model "))
    positions = [head.index(c) for c in COLUMNS]
    assert positions == sorted(positions), head
    table = lines[lines.index(head) + 2:lines.index(head) + 5]
    assert [line.split()[5:7] for line in table] == [["-", "sampling"], ["off", "training"], ["on", "training"]]

    rows = json.loads(out.read_text())["rows"]
    assert [(r["phase"], r.get("checkpointing")) for r in rows] == [
        ("sampling", None), ("training", False), ("training", True)]
    for r in rows:
        assert r["finite"] and r["seconds"] > 0 and r["measured"] >= 0 and r["plan"][r["phase"]] > 0, r
        assert r["device"] == "cpu" and r["size"] == 64 and r["unet_parameters"] > 0
    off, on = rows[1], rows[2]
    assert on["plan"]["training"] < off["plan"]["training"]  # checkpointing lowers the plan's training peak
    assert off["grad_norm"] > 0 and on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-3)  # the same gradient


def _flops(tmp_path, *extra):
    out = tmp_path / "flops.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_fullsize.py"), "--flops", "--tiny", "--models", "sd15",
         "--json", str(out), *extra], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())["flops"]


def test_flops_mode_counts_the_epochs_work_and_its_shares(tmp_path):
    """--flops counts on the meta device: the training step is the call's forward plus a backward of about the
    same size, the decode's work grows with the pixels (4x for twice the side) while the encoder's does not, and
    the lowest ratio is 1 + the decode's and the encoder's shares of the U-Net's epoch work."""
    stdout, (small,) = _flops(tmp_path, "--size", "64", "--work-ratio", "1.05")
    _, (big,) = _flops(tmp_path, "--size", "128")
    assert "decode %" in stdout and "projected" in stdout
    assert 1.5 * small["call_flops"] < small["train_flops"] < 3 * small["call_flops"]
    assert big["decode_flops"] == pytest.approx(4 * small["decode_flops"], rel=0.02)
    assert big["encode_flops"] == small["encode_flops"]
    assert 0 < small["encode_share"] < small["decode_share"] < 1
    assert small["lowest_total_ratio"] == pytest.approx(1 + small["decode_share"] + small["encode_share"])
    assert small["projected_total_ratio"] == pytest.approx(1.05 * small["lowest_total_ratio"])
