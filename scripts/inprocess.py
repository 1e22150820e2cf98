"""ComfyUI in this process, for scripts that use the pack's Python API (model building, experiments).

    from inprocess import setup; pack = setup()   # then importlib.import_module("texforce_pack.toy.comfy_model")

Puts the cached ComfyUI tree of scripts/comfy_host.py (or TEXFORCE_COMFY_DIR) on sys.path, selects the CPU
unless an accelerator is present (before comfy.model_management is imported) and imports this repository as
the package `texforce_pack`, as ComfyUI imports a custom-node folder. Scripts only: the pack itself never
touches sys.path.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "texforce_pack"


def _load(name: str, path: Path, package: bool = False) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py" if package else path, submodule_search_locations=[str(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def setup(cpu: bool | None = None) -> ModuleType:
    """Import ComfyUI and the pack; cpu=None: the CPU unless torch sees an accelerator."""
    import torch

    comfy_host = _load("texforce_comfy_host", REPO / "scripts" / "comfy_host.py")
    comfy_dir = Path(os.environ.get("TEXFORCE_COMFY_DIR") or comfy_host.comfy_dir())
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    if cpu is None:
        cpu = not (torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()))
    if cpu:
        comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
    import comfy.model_management  # noqa: F401

    return _load(PACK_NAME, REPO, package=True)


def pack_module(name: str) -> ModuleType:
    """A module of the pack by its path inside the repository, e.g. "training.loop"."""
    return importlib.import_module(f"{PACK_NAME}.{name}")
