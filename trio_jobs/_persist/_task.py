"""The persistence task: open the store, recover, then persist until cancelled; and the
registry's backing (its one typed slot onto the store)."""

from __future__ import annotations

import trio

from .._exceptions import StoreUnavailable
from .._job import Job
from .._models import JobPage, JobQuery, JobRecord
from .._registry import JobRegistry
from .._stores._base import JobStore
from ._recovery import load_finished, recover
from ._shared import SharedRunner
from ._writer import Persister

__all__ = ["StoreBacking", "run_persistence"]


class StoreBacking:
    """What a persisted registry asks of its store (``JobRegistry.backing``)."""

    def __init__(self, registry: JobRegistry, persister: Persister) -> None:
        self.registry = registry
        self.persister = persister
        self.shared: SharedRunner | None = None
        """Set while :func:`run_shared_jobs` runs: other nodes' jobs are followed."""

    async def load(self, job_id: str) -> bool:
        if self.shared is not None:
            return await self.shared.follow(job_id)
        return await load_finished(self.registry, self.persister.store, job_id) is not None

    async def fetch(self, job_id: str) -> JobRecord | None:
        stored = await self.persister.store.load_job(job_id)
        return None if stored is None else stored.record

    def cancel_elsewhere(self, job: Job) -> bool:
        return self.shared is not None and self.shared.cancel_elsewhere(job)

    async def before_attempt(self, job: Job) -> None:
        await self.persister.before_attempt(job)

    async def acknowledge(self, job: Job) -> None:
        await self.persister.acknowledge(job)

    async def query(self, query: JobQuery) -> JobPage:
        try:
            await self.persister.flush()  # this node's latest states are what is listed
            return await self.persister.store.query_jobs(query)
        except Exception as exc:
            raise StoreUnavailable(f"the job store cannot list jobs: {exc}") from exc


async def run_persistence(
    registry: JobRegistry,
    store: JobStore | None = None,
    *,
    interval: float = 0.02,
    max_batch: int = 2000,
    grace: float = 5.0,
    headroom: int = 256,
    ack_timeout: float = 5.0,
    task_status: trio.TaskStatus[Persister] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the store, recover its jobs into ``registry``, then persist changes until
    cancelled.

    ``task_status.started(persister)`` is called once recovery is complete, so a runner
    started after it sees the recovered queue. While this runs, ``registry.submit``
    returns once a job is committed, attempts start once they are stored, and readers see
    event ids the store has reserved (see :class:`Persister`). When cancelled, what is
    still pending is written (shielded, for at most ``grace`` seconds, also giving jobs
    being cancelled that long to end) and the store is closed.
    """
    store = store if store is not None else registry.store
    if store is None:
        raise ValueError("no store given and the registry has none")
    if registry.backing is not None:
        raise RuntimeError("the registry is already being persisted")
    registry.store = store
    persister = Persister(
        registry,
        store,
        interval=interval,
        max_batch=max_batch,
        headroom=headroom,
        ack_timeout=ack_timeout,
    )
    await store.open()
    backing = StoreBacking(registry, persister)
    registry.backing = backing
    registry.add_observer(persister.observe)
    try:
        try:
            await recover(registry, store, persister, node=getattr(store, "node", None))
            task_status.started(persister)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(persister.watch_acks)
                await persister.run()
        finally:
            await persister.drain(grace)
            registry.remove_observer(persister.observe)
    finally:
        registry.backing = None
        with trio.CancelScope(shield=True):
            await store.aclose()


def persister_of(registry: JobRegistry) -> Persister | None:
    """The persister of a registry being persisted, else None."""
    backing = registry.backing
    return backing.persister if isinstance(backing, StoreBacking) else None
