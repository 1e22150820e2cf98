"""Install the pack's requirements into the Python that runs ComfyUI (ComfyUI-Manager and A1111 run this file).

    python install.py [--dry-run]

torch belongs to ComfyUI: it is never installed, upgraded or downgraded here. The installed torch
(and torchvision/torchaudio, if present) are pinned as constraints, so no requirement can move them.
"""
from __future__ import annotations

import importlib.metadata as metadata
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("texforce.install")
HERE = Path(__file__).resolve().parent
PROTECTED = ("torch", "torchvision", "torchaudio")


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    reqs = [line.split("#")[0].strip() for line in lines]
    reqs = [r for r in reqs if r]
    bad = [r for r in reqs if r.split("=")[0].split(">")[0].split("<")[0].strip().lower() in PROTECTED]
    if bad:
        raise SystemExit(f"requirements.txt must not list {bad}: torch is ComfyUI's to manage")
    return reqs


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[TexForce] %(message)s")
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        log.error("torch is not installed in %s; install ComfyUI (and its torch) first.", sys.executable)
        return 1
    pins = [f"{name}=={metadata.version(name)}" for name in PROTECTED if _installed(name)]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(pins) + "\n")
        constraints = f.name
    cmd = [sys.executable, "-m", "pip", "install", "-c", constraints, *_requirements()]
    if "--dry-run" in sys.argv[1:]:
        cmd.insert(4, "--dry-run")
    log.info("installing requirements with %s (torch %s kept as is)", sys.executable, torch_version)
    try:
        return subprocess.call(cmd)
    finally:
        Path(constraints).unlink(missing_ok=True)


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
