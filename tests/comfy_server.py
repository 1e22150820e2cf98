"""Test helpers for talking to a real ComfyUI server (not a test module).

``start_test_server`` starts ComfyUI (from the cached environment of ``scripts/comfy_host.py``)
with this repository loaded as the custom-node pack ``ComfyUI-TexForce``; ``ComfyClient``
drives it over HTTP with urllib only; ``RunProgress`` follows a training run while its prompt executes
(``client.run(prompt, progress=RunProgress(client, "my_run"))`` logs each epoch as it finishes).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
_HOST_FILE = REPO_ROOT / "scripts" / "comfy_host.py"


def _load_comfy_host():
    name = "texforce_comfy_host"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _HOST_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: dataclasses look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


log = logging.getLogger("texforce.comfy_server")
comfy_host = _load_comfy_host()
Server = comfy_host.Server
stop_server = comfy_host.stop


class ComfyError(RuntimeError):
    """ComfyUI refused a prompt or failed while executing it."""


def _format_messages(messages: Iterable[Any]) -> str:
    """Readable text for a history entry's ``status.messages`` ([[event, data], ...])."""
    out = []
    for item in messages or []:
        try:
            event, data = item
        except (TypeError, ValueError):
            out.append(repr(item))
            continue
        if event == "execution_error" and isinstance(data, dict):
            tb = "".join(data.get("traceback") or [])
            out.append(
                f"execution_error in node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}".rstrip()
            )
        elif event in ("execution_start", "execution_cached", "execution_success"):
            continue
        else:
            out.append(f"{event}: {json.dumps(data, default=str)[:2000]}")
    return "\n".join(out) or "(no messages)"


class ComfyClient:
    def __init__(self, url: str, client_id: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------------------
    def _open(self, path: str, data: bytes | None = None, method: str | None = None):
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        return urllib.request.urlopen(req, timeout=self.timeout)

    def get_bytes(self, path: str) -> bytes:
        with self._open(path) as r:
            return r.read()

    def get_json(self, path: str) -> Any:
        return json.loads(self.get_bytes(path).decode("utf-8"))

    def post_json(self, path: str, payload: Any) -> Any:
        with self._open(path, json.dumps(payload).encode("utf-8"), "POST") as r:
            body = r.read()
        return json.loads(body.decode("utf-8")) if body else None

    # -- API --------------------------------------------------------------------------
    def object_info(self, node_class: str | None = None) -> dict:
        if node_class:
            return self.get_json("/object_info/" + urllib.parse.quote(node_class, safe=""))
        return self.get_json("/object_info")

    def queue(self, prompt_api: Mapping[str, Any]) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise ComfyError with the body."""
        payload = {"prompt": prompt_api, "client_id": self.client_id}
        try:
            resp = self.post_json("/prompt", payload)
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", errors="replace")
            try:
                body = json.dumps(json.loads(body), indent=1)
            except ValueError:
                pass
            raise ComfyError(f"POST /prompt refused ({e.code}):\n{body}") from None
        if resp.get("node_errors"):
            raise ComfyError(f"POST /prompt node errors:\n{json.dumps(resp['node_errors'], indent=1)}")
        return resp["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.05,
             progress: Callable[[bool], Any] | None = None) -> dict:
        """Poll GET /history/<id> until the prompt has finished; return its history entry. ``progress(final)``
        is called before every poll with False and once at the end with True (e.g. a RunProgress)."""
        deadline = time.monotonic() + timeout
        while True:
            if progress is not None:
                progress(False)
            hist = self.get_json("/history/" + urllib.parse.quote(prompt_id, safe=""))
            entry = hist.get(prompt_id) if isinstance(hist, dict) else None
            if entry is not None:
                if progress is not None:
                    progress(True)
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    raise ComfyError(f"prompt {prompt_id} failed:\n{_format_messages(status.get('messages'))}")
                return entry
            if time.monotonic() > deadline:
                try:
                    queue = json.dumps(self.get_json("/queue"), default=str)[:2000]
                except Exception as e:  # noqa: BLE001 - best-effort diagnostics
                    queue = f"<GET /queue failed: {e}>"
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s; queue: {queue}")
            time.sleep(poll)

    def run(self, prompt_api: Mapping[str, Any], timeout: float = 120.0,
            progress: Callable[[bool], Any] | None = None) -> dict:
        """Queue a prompt and wait for it (see ``wait``); returns the history entry (with ``outputs``)."""
        return self.wait(self.queue(prompt_api), timeout=timeout, progress=progress)


def format_epoch(stats: Mapping[str, Any], epochs: int | None) -> str:
    """One line per epoch: 'epoch 3/30  reward 0.123 ± 0.045  (2.1 s)'."""
    def num(key: str) -> str:
        value = stats.get(key)
        return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"

    seconds = sum(v for k in ("seconds_sampling", "seconds_reward", "seconds_training")
                  if isinstance(v := stats.get(k), (int, float)))
    total = f"/{epochs}" if epochs else ""
    return (f"epoch {stats.get('epoch')}{total}  reward {num('reward_mean')} ± {num('reward_std')}"
            + (f"  ({seconds:.1f} s)" if seconds else ""))


class RunProgress:
    """Follows a TexForce training run through GET /texforce/runs/<run> (the registry the browser's chart reads)
    while a prompt executes: each epoch is reported once, as it finishes, to ``on_epoch(stats, epochs)`` (default:
    an INFO log line). Pass it as ``progress`` to ``ComfyClient.run``/``wait``: it asks the server at most every
    ``interval`` seconds (always when ``final``) and never raises (a run the server does not know yet is simply
    not reported yet)."""

    def __init__(self, client: ComfyClient, run: str, on_epoch: Callable[[dict, int | None], Any] | None = None,
                 interval: float = 1.0):
        self.client, self.run, self.interval = client, run, interval
        self.on_epoch = on_epoch or (lambda stats, epochs: log.info("%s", format_epoch(stats, epochs)))
        self.reported = 0  # the last epoch reported
        self.status: str | None = None
        self._next = 0.0

    def __call__(self, final: bool = False) -> list[dict]:
        """Report the epochs finished since the last call; returns them."""
        now = time.monotonic()
        if now < self._next and not final:
            return []
        self._next = now + self.interval
        try:
            run = self.client.get_json("/texforce/runs/" + urllib.parse.quote(self.run, safe="/"))
        except (urllib.error.URLError, OSError, ValueError):
            return []
        self.status = run.get("status")
        new = [h for h in run.get("history") or [] if isinstance(h.get("epoch"), int) and h["epoch"] > self.reported]
        for stats in new:
            self.on_epoch(stats, run.get("epochs"))
            self.reported = stats["epoch"]
        return new


def start_test_server(
    tmp_base: Path,
    extra_node_dirs: Iterable[Path] = (),
    **kwargs: Any,
) -> Server:
    """Start ComfyUI with base directory ``tmp_base`` and this repository loaded as a pack.

    ``extra_node_dirs`` are further folders containing custom-node packs. Other keyword
    arguments (port, extra_args, env, timeout) go to ``comfy_host.start``. Stop the server with
    ``stop_server(server)``.
    """
    tmp_base = Path(tmp_base)
    link_dir = comfy_host.pack_link_dir(REPO_ROOT, tmp_base / "pack_link")
    return comfy_host.start(tmp_base, [link_dir, *map(Path, extra_node_dirs)], **kwargs)
