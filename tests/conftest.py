"""Pytest set-up: a real ComfyUI importable in-process (CPU), this pack imported as a package, tiny models.

Tests run with the cached venv's python (`make test`); ComfyUI's tree is located through
scripts/comfy_host.py, or TEXFORCE_COMFY_DIR.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_NODES = REPO / "tests" / "comfy_nodes"
PACK_NAME = "texforce_pack"


def _load(name: str, path: Path, package: bool = False):
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py" if package else path, submodule_search_locations=[str(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


comfy_host = _load("texforce_comfy_host", REPO / "scripts" / "comfy_host.py")
COMFY_DIR = Path(os.environ.get("TEXFORCE_COMFY_DIR") or comfy_host.comfy_dir())
if str(COMFY_DIR) not in sys.path:
    sys.path.insert(0, str(COMFY_DIR))  # tests only: the shipped pack never touches sys.path

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
import comfy.model_management  # noqa: E402,F401
import folder_paths  # noqa: E402
# Pin ComfyUI's top-level `nodes` now: pytest may later put the repository root on sys.path (when the
# clone's folder name is not an identifier), where this pack's own `nodes/` package would shadow it.
import nodes as _comfy_nodes  # noqa: E402,F401

assert Path(_comfy_nodes.__file__).parent == COMFY_DIR, _comfy_nodes.__file__

pack = _load(PACK_NAME, REPO, package=True)
importlib.import_module(f"{PACK_NAME}.nodes")  # what comfy_entrypoint imports
tiny_models = _load("texforce_test_nodes", TEST_NODES / "texforce_test_nodes", package=True).tiny_models


@pytest.fixture
def loras_dir(tmp_path, monkeypatch):
    """A fresh models/loras folder registered with folder_paths (as the only loras folder)."""
    d = tmp_path / "loras"
    d.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(d)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.pop("loras", None)
    yield d
    folder_paths.filename_list_cache.pop("loras", None)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real ComfyUI server for the session: this pack (as 'ComfyUI-TexForce') plus the test-only nodes."""
    from comfy_server import ComfyClient, start_test_server, stop_server

    base = tmp_path_factory.mktemp("comfy_base")
    srv = start_test_server(base, [TEST_NODES])
    client = ComfyClient(srv.url)
    client.base = base
    client.log_path = srv.log_path
    try:
        yield client
    finally:
        stop_server(srv)
