"""The pack as users install it: import outside ComfyUI, install.py never touching torch."""
from __future__ import annotations

import importlib.util
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


def test_install_script_is_quiet_unless_something_changes(capfd):
    proc = subprocess.run([sys.executable, str(REPO / "install.py"), "--dry-run"], capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0 and not any("Requirement already satisfied" in line for line in lines), lines
    assert lines[-1] == "[TexForce] all requirements already satisfied; nothing changed"
    assert [line for line in lines if not line.startswith(("[TexForce]", "WARNING:"))] == []  # pip's own lines hidden
    spec = importlib.util.spec_from_file_location("texforce_install", REPO / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    fake_pip = [sys.executable, "-c", "print('Requirement already satisfied: a in /x'); print('Collecting b==2'); "
                                      "print('Successfully installed b-2'); raise SystemExit(3)"]
    assert install._run_filtered(fake_pip) == (3, 2)
    assert capfd.readouterr().out == "Collecting b==2\nSuccessfully installed b-2\n"
