"""Live workers, as told by their heartbeats, and picking one for an ``infer``.

A worker heartbeats to one queen. Queens sharing a PostgreSQL store record each heartbeat
there and read the others' back (:meth:`WorkerTable.merge`), so every queen schedules on
every live worker; liveness is the same TTL rule whichever queen heard the worker.

Capacity: a worker advertises how many jobs it runs at once (``capacity``, its
``max_concurrent``; absent: no limit). A worker's load is the jobs this queen has in
flight on it (:attr:`WorkerTable.assigned`, exact and current) plus the jobs it ran for
anyone else (other queens, direct clients) as of its last heartbeat: its reported
``running`` less what this queen had assigned to it then. :meth:`WorkerTable.take` waits
for a worker with room and reserves the slot in the same step.

Fairness: jobs waiting for a slot queue in arrival order. Whenever room may have appeared
(a heartbeat, a released slot, a newcomer) the free slots are handed out there and then,
oldest waiter first, each to the waiter's least busy worker with room: a freed slot goes
to the oldest waiter that can use it (same model, and hive when it names one), and a
newcomer never takes a slot an older waiter could take. A waiter that is cancelled or
gives up leaves the queue; one cancelled just after it was handed a slot gives it back.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

__all__ = ["NoWorker", "WorkerEntry", "WorkerTable", "WorkersBusy"]


class NoWorker(LookupError):
    """No live worker serves the requested model."""


class WorkersBusy(NoWorker):
    """Live workers serve the model, but every one of them stayed at its capacity."""


@dataclass(eq=False)
class _Waiter:
    """One :meth:`WorkerTable.take` in the queue; ``entry`` is set when it is served."""

    model: str
    hive_id: str | None
    served: trio.Event = field(default_factory=trio.Event)
    entry: WorkerEntry | None = None


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
    via: str | None = None
    """The queen (node) that heard this heartbeat; None: this one."""
    capacity: int | None = None
    """Jobs the worker runs at once (its ``max_concurrent``); None: no limit."""
    foreign: int = 0
    """Jobs it ran for others than this queen at its last heartbeat (set by the table)."""

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
            "via": self.via,
            "capacity": self.capacity,
        }

    @classmethod
    def from_beat(
        cls, data: dict[str, Any], last_seen: float, via: str | None = None
    ) -> WorkerEntry:
        """The entry for a (validated) heartbeat heard at trio time ``last_seen``."""
        return cls(
            worker_id=str(data["worker_id"]),
            url=str(data["url"]).rstrip("/"),
            model=str(data["model"]),
            hive_id=data.get("hive_id"),
            pid=data.get("pid"),
            state=str(data.get("state", "ready")),
            running=int(data.get("running", 0)),
            backend=data.get("backend"),
            last_seen=last_seen,
            via=via,
            capacity=data.get("capacity"),
        )


class WorkerTable:
    """Workers report here directly (``POST /v1/workers/heartbeat``); the queen reads it.

    A worker is live while its last heartbeat is younger than ``ttl_s`` and it has not said
    ``stopping``; it is scheduled only while it says ``ready`` or ``busy`` (a worker whose
    backend cannot serve says ``not_ready``). A ``stopping`` worker still counts for
    :meth:`is_live` while it heartbeats: its jobs are ending with their own signals.
    Heartbeats heard by other queens come in through :meth:`merge`; ``refresh`` (when
    given) is awaited by :meth:`pick` before it waits for a worker to appear, so a worker
    another queen just heard is found at once.
    """

    SCHEDULABLE = frozenset({"ready", "busy"})

    def __init__(
        self, ttl_s: float = 5.0, *, refresh: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.ttl_s = ttl_s
        self.refresh = refresh
        self._workers: dict[str, WorkerEntry] = {}
        self._changed = trio.Event()
        self._forgotten: dict[str, float] = {}
        """Worker id -> trio time it was forgotten: not scheduled again until a heartbeat
        newer than that (heard here or by another queen)."""
        self.assigned: dict[str, int] = {}
        """Worker id -> jobs this queen has in flight there (:meth:`take`, :meth:`release`)."""
        self._waiters: dict[_Waiter, None] = {}
        """The takes waiting for a slot, oldest first (a dict: ordered, O(1) removal)."""

    @property
    def waiting(self) -> int:
        """Jobs waiting for a slot (:meth:`take`)."""
        return len(self._waiters)

    def _wake(self) -> None:
        """Room may have appeared: serve the queue, then wake :meth:`pick`."""
        self._serve()
        self._changed.set()
        self._changed = trio.Event()

    def _serve(self) -> None:
        """Hand free slots to the waiters, oldest first (see the module docstring)."""
        if not self._waiters:
            return
        room = [e for e in self.live() if e.state in self.SCHEDULABLE and self.has_room(e)]
        stuck: set[tuple[str, str | None]] = set()
        for waiter in list(self._waiters):
            if not room:
                return
            key = (waiter.model, waiter.hive_id)
            if key in stuck:
                continue
            fits = [
                e for e in room if e.model == waiter.model and waiter.hive_id in (None, e.hive_id)
            ]
            if not fits:
                stuck.add(key)  # nor for anyone after it with the same wish
                continue
            entry = min(fits, key=self._load)
            self.assigned[entry.worker_id] = self.assigned.get(entry.worker_id, 0) + 1
            if not self.has_room(entry):
                room.remove(entry)
            del self._waiters[waiter]
            waiter.entry = entry
            waiter.served.set()

    def beat(self, data: dict[str, Any]) -> WorkerEntry | None:
        """Record a heartbeat (validated by the caller); ``stopping`` ends scheduling on it."""
        entry = WorkerEntry.from_beat(data, trio.current_time())
        worker_id = entry.worker_id
        self._enter(entry)
        self._forgotten.pop(worker_id, None)
        self._wake()
        return entry

    def merge(self, beats: Iterable[tuple[dict[str, Any], float, str | None]]) -> None:
        """Take heartbeats other queens heard: ``(heartbeat, epoch time heard, node)``.

        A worker heard here more recently keeps its entry; one that was forgotten is not
        scheduled until a heartbeat newer than the forgetting.
        """
        now_trio, now = trio.current_time(), time.time()
        changed = False
        for data, seen_at, node in beats:
            worker_id = str(data["worker_id"])
            last_seen = now_trio - max(0.0, now - seen_at)
            known = self._workers.get(worker_id)
            if known is not None and known.last_seen >= last_seen:
                continue
            forgotten = self._forgotten.get(worker_id)
            if forgotten is not None and last_seen > forgotten:
                del self._forgotten[worker_id]
            self._enter(WorkerEntry.from_beat(data, last_seen, node))
            changed = True
        if changed:
            self._wake()

    def _enter(self, entry: WorkerEntry) -> None:
        """Keep ``entry``; what it ran beyond this queen's jobs there is ``foreign``."""
        entry.foreign = max(0, entry.running - self.assigned.get(entry.worker_id, 0))
        self._workers[entry.worker_id] = entry

    def forget(self, worker_id: str) -> None:
        """Stop scheduling on ``worker_id`` until a heartbeat newer than now (one job could
        not reach it; :meth:`is_live` still follows its heartbeats, so its other jobs go
        on)."""
        if worker_id in self._workers:
            self._forgotten[worker_id] = trio.current_time()

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

    def live_for(self, model: str, hive_id: str | None = None) -> list[WorkerEntry]:
        """Schedulable workers serving ``model`` (on hive ``hive_id``), least busy first."""
        return sorted(self._schedulable(model, hive_id), key=self._load)

    def _schedulable(self, model: str, hive_id: str | None) -> list[WorkerEntry]:
        return [e for e in self.live(model, hive_id) if e.state in self.SCHEDULABLE]

    def load(self, entry: WorkerEntry) -> int:
        """Jobs ``entry`` runs now as far as this queen knows (see the module docstring)."""
        return self.assigned.get(entry.worker_id, 0) + entry.foreign

    def has_room(self, entry: WorkerEntry) -> bool:
        """True while ``entry`` is below its advertised capacity (or advertises none)."""
        return entry.capacity is None or self.load(entry) < entry.capacity

    def _load(self, entry: WorkerEntry) -> tuple[int, str]:
        return (self.load(entry), entry.worker_id)

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

    async def _wait_for(
        self, found: Callable[[], list[WorkerEntry]], wait_s: float
    ) -> list[WorkerEntry]:
        """What ``found`` returns once it is not empty (or at ``wait_s``); heartbeats and
        released slots wake the wait. Returns right after the last check (no checkpoint
        in between, so the caller may act on it before anyone else runs)."""
        with trio.move_on_after(wait_s):
            if not found() and self.refresh is not None:
                await self.refresh()
            while not found():
                await self._changed.wait()
        return found()

    async def pick(self, model: str, hive_id: str | None, wait_s: float) -> WorkerEntry:
        """The least busy live worker for ``model``, waiting up to ``wait_s`` for one
        (whatever its load: see :meth:`take` to schedule a job).

        Raises:
            NoWorker: none appeared in time.
        """
        candidates = await self._wait_for(partial(self._schedulable, model, hive_id), wait_s)
        if candidates:
            await trio.lowlevel.checkpoint()
            return min(candidates, key=self._load)
        raise self._no_worker(model, hive_id)

    async def take(self, model: str, hive_id: str | None, wait_s: float) -> WorkerEntry:
        """The least busy live worker for ``model`` with room for one more job, waiting up
        to ``wait_s`` (may be ``math.inf``) for one, in turn with the other waiters (see
        the module docstring); the job is counted in :attr:`assigned` at once (so nobody
        else takes the same slot): hand it back with :meth:`release`. Cancelled while
        waiting, it leaves the queue and reserves nothing.

        Raises:
            WorkersBusy: workers serve ``model`` but every one stayed at its capacity.
            NoWorker: no live worker serves ``model``.
        """
        await trio.lowlevel.checkpoint()
        waiter = _Waiter(model, hive_id)
        self._waiters[waiter] = None
        self._serve()
        try:
            with trio.move_on_after(wait_s):
                if waiter.entry is None and self.refresh is not None:
                    await self.refresh()  # beats another queen heard: served by merge
                await waiter.served.wait()
        except BaseException:
            self._leave(waiter)
            raise
        if waiter.entry is not None:
            return waiter.entry
        del self._waiters[waiter]
        raise self.unavailable(model, hive_id, wait_s)

    def _leave(self, waiter: _Waiter) -> None:
        """``waiter`` gives up: out of the queue, or its slot back if it was served."""
        if waiter.entry is not None:
            self.release(waiter.entry.worker_id)
        else:
            self._waiters.pop(waiter, None)

    def unavailable(self, model: str, hive_id: str | None, waited_s: float) -> NoWorker:
        """Why ``model`` gets no slot now, after a wait of ``waited_s``: a
        :class:`WorkersBusy` naming the workers' loads, or a :class:`NoWorker`."""
        full = self._schedulable(model, hive_id)
        if not full:
            return self._no_worker(model, hive_id)
        loads = ", ".join(
            f"{e.worker_id} {self.load(e)}/{e.capacity}" for e in sorted(full, key=self._load)
        )
        return WorkersBusy(
            f"all {len(full)} live worker(s) serving model {model!r} stayed at capacity "
            f"for {waited_s:g}s ({loads} jobs)"
        )

    def release(self, worker_id: str) -> None:
        """Give back a slot :meth:`take` reserved on ``worker_id`` (wakes waiters)."""
        left = self.assigned.get(worker_id, 0) - 1
        if left > 0:
            self.assigned[worker_id] = left
        else:
            self.assigned.pop(worker_id, None)
        self._wake()

    def _no_worker(self, model: str, hive_id: str | None) -> NoWorker:
        where = f" on hive {hive_id!r}" if hive_id else ""
        others = sorted(
            f"{e.worker_id} ({e.model}{'' if e.state in self.SCHEDULABLE else ', ' + e.state})"
            for e in self.live()
        )
        return NoWorker(
            f"no live worker serves model {model!r}{where} "
            f"(live workers: {', '.join(others) or 'none'}; spawn one with worker_spawn)"
        )
