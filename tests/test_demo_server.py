"""The demo's server lifecycle (scripts/demo.py, scripts/comfy_host.py): a start never takes another server for its
own, a new demo replaces the one an earlier demo left running, and `python3 scripts/demo.py --stop` stops exactly
that server with any python3 (no torch needed)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from comfy_server import comfy_host, start_test_server
from conftest import REPO

DEMO = REPO / "scripts" / "demo.py"
BASE_PYTHON = getattr(sys, "_base_executable", None) or sys.executable  # the python the venv was made from
START_DEMO_SERVER = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('demo', sys.argv[1]); "
                     "demo = importlib.util.module_from_spec(spec); spec.loader.exec_module(demo); "
                     "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
                     "s = demo.start_demo_server(__import__('pathlib').Path(sys.argv[2]), int(sys.argv[3])); "
                     "print('PID', s.pid)")


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def start_demo_server(base, port) -> tuple[int, str]:
    """The demo's own start (in a process of its own, which exits and leaves the server running, as the demo does)."""
    out = run([sys.executable, "-c", START_DEMO_SERVER, str(DEMO), str(base), str(port)])
    assert out.returncode == 0, out.stdout + out.stderr
    return int(out.stdout.split("PID")[-1]), out.stdout + out.stderr


def test_start_refuses_a_port_that_is_in_use(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert comfy_host.port_in_use(port)
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_test_server(tmp_path / "base", port=port, timeout=30)
    assert not (tmp_path / "base" / "server.log").exists()  # refused before starting anything
    assert not comfy_host.port_in_use(port)


def test_readiness_checks_that_the_server_is_this_start_s_own(server):
    """What start waits for: /system_stats answered with this start's own command line, by the process that
    holds the listening socket. Another server on the port (an earlier demo with the same command line) fails
    the second check."""
    port = int(server.url.rsplit(":", 1)[1])
    argv = server.get_json("/system_stats")["system"]["argv"]
    assert "--base-directory" in argv and str(port) in argv
    assert comfy_host._answers_as(server.url, argv)
    assert not comfy_host._answers_as(server.url, [*argv, "--another-start"])
    assert comfy_host.owns_port(os.getpid(), port) is False
    pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and comfy_host.is_comfy_server(int(p), server.base))
    assert comfy_host.owns_port(pid, port) is True


def test_demo_replaces_its_earlier_server_and_stop_needs_no_torch(tmp_path):
    base, port = tmp_path / "demo", comfy_host.free_port()
    state = base / "demo_server.json"
    first, _ = start_demo_server(base, port)
    try:
        assert json.loads(state.read_text())["pid"] == first and comfy_host.owns_port(first, port)
        # a second demo on the same port stops the first (its own, recorded) and starts again
        second, log = start_demo_server(base, port)
        assert f"stopping the demo server an earlier run left running (pid {first}" in log
        assert second != first and not comfy_host._pid_alive(first) and comfy_host.owns_port(second, port)
        assert "ComfyUI's log (the training's progress goes there too): " + str(base / "server.log") in log
        # the README's stop command, with the python the venv was made from (it has no torch on a fresh machine)
        out = run([BASE_PYTHON, str(DEMO), "--stop", "--base", str(base)], timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"stopped the demo's ComfyUI (pid {second}" in out.stderr and not comfy_host._pid_alive(second)
        assert not state.exists()
        out = run([BASE_PYTHON, str(DEMO), "--stop", "--base", str(base)], timeout=60)
        assert out.returncode == 0 and "no demo server is running (nothing to stop)" in out.stderr
    finally:
        comfy_host.stop_recorded(state)


def test_stop_never_signals_a_process_that_is_not_the_recorded_server(tmp_path):
    base = tmp_path / "demo"
    base.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:  # a stale record whose pid now belongs to another program
        (base / "demo_server.json").write_text(json.dumps({"pid": sleeper.pid, "port": 1, "url": "http://127.0.0.1:1",
                                                           "log": str(base / "server.log"), "base": str(base)}))
        assert comfy_host.recorded(base / "demo_server.json") is None
        out = run([BASE_PYTHON, str(DEMO), "--stop", "--base", str(base)], timeout=60)
        assert out.returncode == 0 and "nothing to stop" in out.stderr
        assert sleeper.poll() is None and not (base / "demo_server.json").exists()
        with pytest.raises(ValueError, match="not a ComfyUI server started by comfy_host"):
            comfy_host.stop(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def _demo_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("texforce_demo_args", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_set_overrides_a_train_input_with_its_type_and_refuses_unknown_names(capsys):
    demo = _demo_module()
    args = demo.parse_args(["--set", "learning_rate=2e-3", "--set", "images_per_prompt=4", "--set", "resume=false"])
    overrides = dict(args.overrides)
    assert overrides == {"learning_rate": 2e-3, "images_per_prompt": 4, "resume": False}
    assert isinstance(overrides["images_per_prompt"], int)
    train = demo.workflow("x", 3, 4, overrides=overrides)["train"]["inputs"]
    assert (train["learning_rate"], train["images_per_prompt"], train["epochs"]) == (2e-3, 4, 3)
    for bad in ("lerning_rate=1", "images_per_prompt=four", "learning_rate"):
        with pytest.raises(SystemExit):
            demo.parse_args(["--set", bad])
        err = capsys.readouterr().err
        assert bad in err and ("INPUT one of" in err or "takes a" in err)
