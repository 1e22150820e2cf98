"""Install the pack's requirements into the Python that runs ComfyUI (ComfyUI-Manager and A1111 run this file).

    python install.py [--dry-run]

torch belongs to ComfyUI: it is never installed, upgraded or downgraded here. The installed torch
(and torchvision/torchaudio, if present) are pinned as constraints, so no requirement can move them.
Quiet unless something changes: pip's "Requirement already satisfied" lines are left out, what it
downloads, installs or fails on is shown.
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
# pip lines that say nothing changed (the indexes lines come from a pip configuration with extra indexes)
QUIET = ("Requirement already satisfied", "Looking in indexes", "Looking in links")


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
    reqs = _requirements()
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
           "-c", constraints, *reqs]
    if "--dry-run" in sys.argv[1:]:
        cmd.insert(4, "--dry-run")
    log.info("checking %d requirements for %s (torch %s kept as is)", len(reqs), sys.executable, torch_version)
    try:
        rc, shown = _run_filtered(cmd)
    finally:
        Path(constraints).unlink(missing_ok=True)
    if rc != 0:
        log.error("pip failed (exit %d): see its messages above", rc)
    elif not shown:
        log.info("all requirements already satisfied; nothing changed")
    return rc


def _run_filtered(cmd: list[str]) -> tuple[int, int]:
    """Run pip, passing its output through without the QUIET lines; (exit status, lines shown)."""
    shown = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        for line in proc.stdout:
            if line.strip() and not line.startswith(QUIET):
                sys.stdout.write(line)
                sys.stdout.flush()
                shown += 1
    return proc.returncode, shown


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
