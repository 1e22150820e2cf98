"""Training runs as the browser sees them: an in-memory registry fed by `texforce.progress` events, and
read-only JSON routes under /texforce/ that let a reloaded page redraw a run's chart.

    GET /texforce/runs          [{"run", "status", "epoch", "epochs", "updated"}, ...] (newest first)
    GET /texforce/runs/{run}    one run with its per-epoch history (400: bad name, empty included; 404: unknown run)

The routes only read this registry: they never open files and never return file-system paths. The registry
reads one file itself, `output/texforce/<run>/history.jsonl`, the first time it sees a run (a resumed run
or a server restarted mid-run), so that the chart starts with the epochs already trained.

Importing this module never needs ComfyUI's server: `register_routes()` does nothing without a running
PromptServer (in-process use, unit tests).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable, Iterable

from ..training.lora.names import BadName, check_name

log = logging.getLogger(__name__)

MAX_HISTORY = 10_000  # epochs kept per run (the latest)
MAX_RUNS = 256  # runs kept; the least recently updated finished ones go first
MAX_ERROR = 2_000
STATUSES = ("running", "done", "cancelled", "failed")
# Fields of a progress event that are about the run, not the epoch's statistics.
RUN_FIELDS = frozenset({"node", "run", "status", "epochs", "error", "seconds"})
MAX_STAT_FIELDS = 64


class BadRunName(ValueError):
    """A run name that the training node would refuse as a save name (or that is not a name at all)."""


def check_run_name(name: Any) -> str:
    """The run name as the registry keys it (surrounding spaces removed), or BadRunName.

    The rule is the one for every name a user gives a file (training/lora/names.py), which the training node
    applies to its lora_name: a run the node would refuse is never listed.
    """
    try:
        return check_name(name, "run name")
    except BadName as e:
        raise BadRunName(str(e)) from None


def _number(value: Any) -> float | int | None:
    """A JSON-safe number: NaN/Inf become None (browsers cannot parse NaN in JSON)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def _epoch_stats(payload: dict) -> dict | None:
    """The per-epoch statistics of an event or history line: its numeric fields, with an integer epoch."""
    epoch = payload.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        return None
    stats: dict[str, Any] = {}
    for key, value in payload.items():
        if key in RUN_FIELDS or not isinstance(key, str) or len(stats) >= MAX_STAT_FIELDS:
            continue
        if isinstance(value, (int, float)) or value is None:
            stats[key] = _number(value)
    stats["epoch"] = epoch
    return stats


def _interrupted() -> bool:
    """Whether the exception being handled is ComfyUI's InterruptProcessingException: Cancel pressed while
    ComfyUI's progress hook ran (it raises that, not the trainer's TrainingCancelled); the run was cancelled,
    it did not fail."""
    exc = sys.exc_info()[1]
    return exc is not None and type(exc).__name__ == "InterruptProcessingException"


class Run:
    def __init__(self, name: str, now: float):
        self.name = name
        self.node: str | None = None
        self.status = "running"
        self.epochs: int | None = None
        self.epoch = 0
        self.error: str | None = None
        self.started = now
        self.updated = now
        self.seconds: float | None = None
        self.history: deque[dict] = deque(maxlen=MAX_HISTORY)

    def add_epoch(self, stats: dict) -> None:
        # an epoch number that is not after the last one means the run started again from there: drop the rest
        while self.history and self.history[-1]["epoch"] >= stats["epoch"]:
            self.history.pop()
        self.history.append(stats)

    def summary(self) -> dict:
        return {"run": self.name, "status": self.status, "epoch": self.epoch, "epochs": self.epochs,
                "updated": self.updated}

    def full(self) -> dict:
        return {**self.summary(), "node": self.node, "error": self.error, "started": self.started,
                "seconds": self.seconds, "history": [dict(h) for h in self.history]}


def read_history_file(path: Path, limit: int = MAX_HISTORY) -> list[dict]:
    """The last `limit` valid epoch lines of a history.jsonl (bad lines are skipped)."""
    lines: deque[str] = deque(maxlen=limit)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                lines.append(line)
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        stats = _epoch_stats(item) if isinstance(item, dict) else None
        if stats is not None:
            out.append(stats)
    return out


class RunRegistry:
    """Thread-safe: events come from the execution thread, route handlers run on the server's event loop."""

    def __init__(self, max_runs: int = MAX_RUNS, clock: Callable[[], float] = time.time):
        self._runs: "OrderedDict[str, Run]" = OrderedDict()
        self._lock = threading.Lock()
        self._max_runs = max_runs
        self._clock = clock

    def record(self, payload: dict, history_file: Callable[[str], Path] | None = None) -> Run | None:
        """Add one `texforce.progress` event. `history_file(name)` locates the run's history.jsonl, read the
        first time a run is seen (so a resumed run's chart starts with its earlier epochs)."""
        if not isinstance(payload, dict):
            return None
        try:
            name = check_run_name(payload.get("run"))
        except BadRunName:
            return None
        status = payload.get("status")
        if status not in STATUSES:
            return None
        if status == "failed" and _interrupted():
            status = "cancelled"
        seed: list[dict] = []
        with self._lock:
            known = name in self._runs
        if not known and history_file is not None:
            try:
                seed = read_history_file(history_file(name))
            except Exception:  # noqa: BLE001 - the chart is a convenience; never fail the training for it
                log.debug("could not read the history of run %r", name, exc_info=True)
        with self._lock:
            now = self._clock()
            run = self._runs.get(name)
            if run is None:
                run = self._runs[name] = Run(name, now)
                for stats in seed:
                    run.add_epoch(stats)
                if run.history:
                    run.epoch = run.history[-1]["epoch"]
            elif status == "running" and run.status != "running":
                run.started, run.error, run.seconds = now, None, None  # queued again: a new leg of the run
            self._runs.move_to_end(name)
            run.updated = now
            run.status = status
            if payload.get("node") is not None:
                run.node = str(payload["node"])[:64]
            epochs = payload.get("epochs")
            if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0:
                run.epochs = epochs
            if status == "running":
                stats = _epoch_stats(payload)
                if stats is not None:
                    run.add_epoch(stats)
                    run.epoch = stats["epoch"]
            else:
                epoch = payload.get("epoch")
                if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > 0:
                    run.epoch = epoch  # cancelled before any epoch of this call reports 0: keep what we had
            if status == "failed":
                run.error = str(payload.get("error") or "unknown error")[:MAX_ERROR]
            if status == "done" and isinstance(_number(payload.get("seconds")), (int, float)):
                run.seconds = payload["seconds"]
            self._evict()
            return run

    def _evict(self) -> None:
        while len(self._runs) > self._max_runs:
            victim = next((n for n, r in self._runs.items() if r.status != "running"), None)
            if victim is None:
                victim = next(iter(self._runs))
            del self._runs[victim]

    def runs(self) -> list[dict]:
        with self._lock:
            return [r.summary() for r in reversed(self._runs.values())]

    def get(self, name: str) -> dict | None:
        with self._lock:
            run = self._runs.get(name)
            return run.full() if run is not None else None

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()


REGISTRY = RunRegistry()


def record(payload: dict, history_file: Callable[[str], Path] | None = None) -> None:
    """What the training node calls for every event it sends; never raises."""
    try:
        REGISTRY.record(payload, history_file)
    except Exception:  # noqa: BLE001
        log.debug("could not record a progress event", exc_info=True)


# -- HTTP ------------------------------------------------------------------------------------------------

ROUTE_PREFIX = "/texforce"
_registered = False


def _json(data: Any, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


async def list_runs(request):
    return _json(REGISTRY.runs())


async def get_run(request):
    try:
        name = check_run_name(request.match_info.get("run", ""))
    except BadRunName as e:
        return _json({"error": f"bad run name: {e}"}, status=400)
    run = REGISTRY.get(name)
    if run is None:
        return _json({"error": "unknown run"}, status=404)
    return _json(run)


def routes() -> Iterable[tuple[str, str, Callable]]:
    return (("GET", f"{ROUTE_PREFIX}/runs", list_runs),
            # the empty name, and any characters (sub-folders "exp/run1", even newlines): the handler checks the
            # name, so every bad name gets a JSON 400 rather than the router's plain 404
            ("GET", f"{ROUTE_PREFIX}/runs/", get_run),
            ("GET", rf"{ROUTE_PREFIX}/runs/{{run:[\s\S]+}}", get_run))


def register_routes() -> bool:
    """Add the routes to ComfyUI's PromptServer if one exists (ComfyUI mirrors them under /api as well)."""
    global _registered
    if _registered:
        return True
    server = sys.modules.get("server")  # ComfyUI's main imports it; never import it here (no server in-process)
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None or not hasattr(prompt_server, "routes"):
        return False
    for method, path, handler in routes():
        prompt_server.routes.route(method, path)(handler)
    _registered = True
    return True
