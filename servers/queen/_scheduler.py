"""Live workers, as told by their heartbeats, and picking one for an ``infer``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

__all__ = ["NoWorker", "WorkerEntry", "WorkerTable"]


class NoWorker(LookupError):
    """No live worker serves the requested model."""


@dataclass
class WorkerEntry:
    """The last heartbeat of one worker; ``last_seen`` is trio time."""

    worker_id: str
    url: str
    model: str
    hive_id: str | None
    pid: int | None
    state: str
    running: int
    backend: str | None
    last_seen: float

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "url": self.url,
            "model": self.model,
            "hive_id": self.hive_id,
            "pid": self.pid,
            "state": self.state,
            "running": self.running,
            "backend": self.backend,
            "seen_s_ago": round(now - self.last_seen, 3),
        }


class WorkerTable:
    """Workers report here directly (``POST /v1/workers/heartbeat``); the queen reads it.

    A worker is live while its last heartbeat is younger than ``ttl_s`` and it has not said
    ``stopping``; it is scheduled only while it says ``ready`` or ``busy`` (a worker whose
    backend cannot serve says ``not_ready``). A ``stopping`` worker still counts for
    :meth:`is_live` while it heartbeats: its jobs are ending with their own signals.
    """

    SCHEDULABLE = frozenset({"ready", "busy"})

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._workers: dict[str, WorkerEntry] = {}
        self._changed = trio.Event()
        self._forgotten: set[str] = set()
        self.assigned: dict[str, int] = {}

    def beat(self, data: dict[str, Any]) -> WorkerEntry | None:
        """Record a heartbeat (validated by the caller); ``stopping`` ends scheduling on it."""
        worker_id = str(data["worker_id"])
        entry = WorkerEntry(
            worker_id=worker_id,
            url=str(data["url"]).rstrip("/"),
            model=str(data["model"]),
            hive_id=data.get("hive_id"),
            pid=data.get("pid"),
            state=str(data.get("state", "ready")),
            running=int(data.get("running", 0)),
            backend=data.get("backend"),
            last_seen=trio.current_time(),
        )
        self._workers[worker_id] = entry
        self._forgotten.discard(worker_id)
        self._changed.set()
        self._changed = trio.Event()
        return entry

    def forget(self, worker_id: str) -> None:
        """Stop scheduling on ``worker_id`` until its next heartbeat (one job could not
        reach it; :meth:`is_live` still follows its heartbeats, so its other jobs go on)."""
        if worker_id in self._workers:
            self._forgotten.add(worker_id)

    def status(self, worker_id: str) -> str | None:
        """The state a heartbeating worker reports, None once its heartbeat is older than
        the TTL."""
        entry = self._workers.get(worker_id)
        if entry is None or entry.last_seen < trio.current_time() - self.ttl_s:
            return None
        return entry.state

    def is_live(self, worker_id: str) -> bool:
        """True while ``worker_id`` heartbeats (``stopping`` included)."""
        return self.status(worker_id) is not None

    def live(self, model: str | None = None, hive_id: str | None = None) -> list[WorkerEntry]:
        """Live workers, optionally only those serving ``model`` on hive ``hive_id``."""
        cutoff = trio.current_time() - self.ttl_s
        out = []
        for entry in list(self._workers.values()):
            if entry.last_seen < cutoff or entry.state == "stopping":
                continue
            if entry.worker_id in self._forgotten:
                continue
            if model is not None and entry.model != model:
                continue
            if hive_id is not None and entry.hive_id != hive_id:
                continue
            out.append(entry)
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        return [entry.to_dict(now) for entry in self.live()]

    async def pick(self, model: str, hive_id: str | None, wait_s: float) -> WorkerEntry:
        """The least busy live worker for ``model``, waiting up to ``wait_s`` for one.

        Raises:
            NoWorker: none appeared in time.
        """

        def schedulable() -> list[WorkerEntry]:
            return [e for e in self.live(model, hive_id) if e.state in self.SCHEDULABLE]

        with trio.move_on_after(wait_s):
            while not schedulable():
                await self._changed.wait()
        candidates = schedulable()
        if candidates:
            await trio.lowlevel.checkpoint()
            return min(
                candidates,
                key=lambda e: (e.running + self.assigned.get(e.worker_id, 0), e.worker_id),
            )
        where = f" on hive {hive_id!r}" if hive_id else ""
        others = sorted(
            f"{e.worker_id} ({e.model}{'' if e.state in self.SCHEDULABLE else ', ' + e.state})"
            for e in self.live()
        )
        raise NoWorker(
            f"no live worker serves model {model!r}{where} "
            f"(live workers: {', '.join(others) or 'none'}; spawn one with worker_spawn)"
        )
