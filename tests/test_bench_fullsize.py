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
