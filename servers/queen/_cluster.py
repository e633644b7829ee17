"""What a queen shares through its job store: hives (every store kind, so they outlive a
restart) and, when queens share one PostgreSQL store, the workers' heartbeats and the
queens themselves.

The store is where queens meet (see ``trio_jobs._stores._base.SharedStore``): a worker
heartbeats to one queen, which records the heartbeat as a ``worker`` member; every queen
reads the members back into its :class:`WorkerTable`, so each schedules on every live
worker. Hives are ``hive`` members: registered (``POST /v1/hives``), SSH-imported and
configured ones, each kept with where it came from. A queen's own config file wins over
the store for the aliases it names.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import trio

from trio_jobs import JobStore

from ._config import HiveEntry
from ._scheduler import WorkerTable

__all__ = ["ClusterBook"]

logger = logging.getLogger("servers.queen")

WORKER, HIVE, QUEEN = "worker", "hive", "queen"
_FORGET_AFTER_S = 600.0
"""Workers and queens silent this long leave the store (their last record is history)."""
_PRUNE_EVERY_S = 60.0


def hive_data(entry: HiveEntry, source: str) -> dict[str, Any]:
    """A hive as stored: where it answers, how to reach its host, its token, its origin."""
    return {
        "alias": entry.alias,
        "url": entry.url,
        "ssh_host": entry.ssh_host,
        "token": entry.token,
        "source": source,
    }


def hive_entry(data: dict[str, Any]) -> HiveEntry:
    return HiveEntry(
        str(data["alias"]),
        str(data["url"]),
        ssh_host=data.get("ssh_host"),
        token=data.get("token"),
    )


class ClusterBook:
    """The queen's record of hives and (shared) workers and queens in its store.

    Args:
        store: the queen's job store (open while :meth:`run` runs).
        hives: the queen's hive table (``QueenConfig.hives``), updated in place.
        configured: aliases from the queen's own configuration (they win over the store).
        workers: the queen's worker table.
        node: this queen's name in the store.
        shared: True when queens share the store (PostgreSQL): workers and queens are
            exchanged too.
        interval: seconds between two reads of the others' members.
    """

    def __init__(
        self,
        store: JobStore,
        hives: dict[str, HiveEntry],
        *,
        configured: set[str],
        workers: WorkerTable,
        node: str,
        shared: bool,
        interval: float = 1.0,
    ) -> None:
        self.store = store
        self.hives = hives
        self.configured = configured
        self.workers = workers
        self.node = node
        self.shared = shared
        self.interval = interval
        self.url: str | None = None
        self.queens: dict[str, str] = {}
        """node -> URL of the live queens on the store (shared mode)."""
        self._beats: dict[str, dict[str, Any]] = {}
        self._hive_writes: dict[str, dict[str, Any]] = {}
        self._wake = trio.Event()
        self._next_read = 0.0
        self._next_prune = time.time() + _PRUNE_EVERY_S
        if shared:
            workers.refresh = self.refresh_workers

    # ---- hives ---------------------------------------------------------------------------

    async def load(self) -> None:
        """At start: the stored hives join the table (configured aliases keep their
        configuration), and the configured ones are recorded for the other queens."""
        await self.read_hives()
        for alias in self.configured:
            entry = self.hives.get(alias)
            if entry is not None:
                await self.store.put_member(HIVE, alias, hive_data(entry, "config"), node=self.node)

    async def read_hives(self) -> None:
        for member in await self.store.members(HIVE):
            if member.key in self.configured:
                continue
            try:
                entry = hive_entry(member.data)
            except (KeyError, TypeError):
                logger.warning("ignoring a malformed stored hive %r", member.key)
                continue
            self.hives[entry.alias] = entry

    def keep_hive(self, entry: HiveEntry, source: str) -> None:
        """Record a registered or imported hive (written by :meth:`run`, at once)."""
        self._hive_writes[entry.alias] = hive_data(entry, source)
        self._wake.set()

    async def save_hive(self, entry: HiveEntry, source: str) -> None:
        """Record a hive now (the caller's answer waits for it)."""
        self._hive_writes.pop(entry.alias, None)
        await self.store.put_member(HIVE, entry.alias, hive_data(entry, source), node=self.node)

    # ---- workers -------------------------------------------------------------------------

    def heard(self, beat: dict[str, Any]) -> None:
        """A worker's heartbeat reached this queen: share it (shared mode)."""
        if self.shared:
            self._beats[str(beat["worker_id"])] = beat
            self._wake.set()

    async def refresh_workers(self) -> None:
        """Read the heartbeats the queens recorded within the TTL into the worker table."""
        since = time.time() - self.workers.ttl_s
        members = await self.store.members(WORKER, seen_since=since)
        self.workers.merge(
            (m.data, m.seen_at, None if m.node == self.node else m.node) for m in members
        )

    # ---- the loop ------------------------------------------------------------------------

    async def _round(self) -> None:
        beats, self._beats = self._beats, {}
        try:
            for worker_id, beat in beats.items():
                # a "stopping" beat is kept too: the other queens drop the worker at once
                await self.store.put_member(WORKER, worker_id, beat, node=self.node)
        except BaseException:
            for worker_id, beat in beats.items():
                self._beats.setdefault(worker_id, beat)
            raise
        writes, self._hive_writes = self._hive_writes, {}
        try:
            for alias, data in writes.items():
                await self.store.put_member(HIVE, alias, data, node=self.node)
        except BaseException:
            for alias, data in writes.items():
                self._hive_writes.setdefault(alias, data)
            raise
        now = time.time()
        if not self.shared or now < self._next_read:
            return
        self._next_read = now + self.interval
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY_S
            for kind in (WORKER, QUEEN):
                for member in await self.store.members(kind):
                    if member.seen_at < now - _FORGET_AFTER_S:
                        await self.store.drop_member(kind, member.key)
        if self.url is not None:
            await self.store.put_member(QUEEN, self.node, {"url": self.url}, node=self.node)
        queens = await self.store.members(QUEEN, seen_since=now - 3 * self.interval - 1)
        self.queens = {m.key: str(m.data.get("url")) for m in queens}
        await self.refresh_workers()
        await self.read_hives()

    async def run(self) -> None:
        """Forever: write what this queen heard, read what the others did (every
        ``interval`` seconds, or at once when there is something to write). Store errors
        are logged and retried; the queen goes on with what it knows."""
        while True:
            self._wake = trio.Event()
            try:
                await self._round()
            except Exception as exc:
                logger.debug("cluster round on %r failed: %s", self.store, exc)
                await trio.sleep(self.interval)
                continue
            if self._beats or self._hive_writes:
                continue
            delay = self._next_read - time.time() if self.shared else math.inf
            with trio.move_on_after(max(0.0, delay)):
                await self._wake.wait()
