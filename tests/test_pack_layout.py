"""The pack as users install it: import outside ComfyUI, install.py never touching torch."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_importing_the_pack_outside_comfyui_does_not_crash_or_load_comfy():
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('tf', r'{REPO}/__init__.py', "
            f"submodule_search_locations=[r'{REPO}']); m = importlib.util.module_from_spec(spec); "
            "sys.modules['tf'] = m; spec.loader.exec_module(m); "
            "assert callable(m.comfy_entrypoint) and m.WEB_DIRECTORY; "
            "assert not any(k == 'comfy' or k.startswith('comfy.') for k in sys.modules), 'comfy imported'; "
            "assert 'torch' not in sys.modules, 'heavy import at package import'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr


def test_install_script_pins_torch_and_never_installs_it():
    proc = subprocess.run([sys.executable, str(REPO / "install.py"), "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "torch" in out and "kept as is" in out
    would = [pkg for line in out.splitlines() if line.startswith("Would install") for pkg in line.split()[2:]]
    assert not any(pkg.rsplit("-", 1)[0].lower() in ("torch", "torchvision", "torchaudio") for pkg in would), would


def test_requirements_do_not_list_torch():
    names = [line.split("#")[0].strip().split("=")[0].split(">")[0].lower()
             for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert not {"torch", "torchvision", "torchaudio"} & set(names)
