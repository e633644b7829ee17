"""Where the lifecycle core and the stores are composed: ``run_jobs``, ``open_job_runner``,
``open_registry`` and ``run_shared_jobs``.

The core below (registry, runner) knows no store; persistence plugs into a registry
through its one typed ``backing`` slot, set here by ``run_persistence``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._persist._shared import SharedRunner, shared_store
from ._persist._task import StoreBacking, run_persistence
from ._persist._writer import Persister
from ._registry import JobRegistry
from ._runner import Executor, run_queue, sweep
from ._stores._base import JobStore

__all__ = ["open_job_runner", "open_registry", "run_jobs", "run_shared_jobs"]


async def run_jobs(
    registry: JobRegistry,
    executor: Executor,
    *,
    max_concurrent: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the registry's queued jobs, now and later, until cancelled.

    Each job runs in its own task, nursery and cancel scope; at most ``max_concurrent``
    at once (None: no limit), highest priority first, FIFO within a priority. When this
    task is cancelled, running jobs are cancelled (they end ``[CANCELLED]``) and waited
    for; queued jobs stay queued. A registry with a ``store`` that is not persisted yet
    is recovered from it before any job starts, and persisted while this runs.
    """
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError("max_concurrent must be >= 1 or None")
    async with trio.open_nursery() as nursery:
        if registry.store is not None and registry.backing is None:
            await nursery.start(run_persistence, registry)
        await run_queue(registry, executor, max_concurrent=max_concurrent, task_status=task_status)


@asynccontextmanager
async def open_job_runner(
    registry: JobRegistry, executor: Executor, *, max_concurrent: int | None = None
) -> AsyncIterator[JobRegistry]:
    """Run the registry's queued jobs with ``executor`` while the block is open.

    Leaving the block cancels the jobs still running and waits for them to end (each
    stream gets ``[CANCELLED]``); jobs still queued stay queued.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_jobs(
                registry, executor, max_concurrent=max_concurrent, task_status=task_status
            )
        )
        try:
            yield registry
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_registry(
    store: JobStore | None = None,
    *,
    interval: float = 0.02,
    grace: float = 5.0,
    **options: Any,
) -> AsyncIterator[JobRegistry]:
    """A :class:`JobRegistry` persisted to ``store`` (recovered from it first).

    ``options`` go to ``JobRegistry``. Without a store this is a plain registry. On exit,
    pending changes are written (for at most ``grace`` seconds) and the store is closed.
    """
    registry = JobRegistry(store=store, **options)
    if store is None:
        await trio.lowlevel.checkpoint()
        yield registry
        return
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_persistence(
                registry, store, interval=interval, grace=grace, task_status=task_status
            )
        )
        try:
            yield registry
        finally:
            nursery.cancel_scope.cancel()


async def run_shared_jobs(
    registry: JobRegistry,
    executor: Executor,
    *,
    max_concurrent: int | None = None,
    poll_interval: float = 0.05,
    lease: float = 10.0,
    claim: bool = True,
    listen: bool = True,
    task_status: trio.TaskStatus[SharedRunner] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run jobs of a PostgreSQL table shared by several nodes (queens), until cancelled.

    Use instead of :func:`run_jobs` when several processes share one
    ``PostgresStore(dsn, node=<unique name>)``: jobs created on any node are claimed
    through the database, each on whichever node has a free slot, and a job runs at most
    as often as its retry policy allows, even when a node dies mid-claim (see
    :class:`SharedRunner`); a node's ``get``/``subscribe``/``cancel_job`` keep working
    for the jobs it created even when another node runs them; a node that dies (no lease
    renewal for ``lease`` seconds) leaves its jobs to the others, which re-queue or fail
    them as restart recovery does. Persistence is started here if it is not running yet.
    When cancelled, this node's running jobs end ``[CANCELLED]`` and are written.

    ``claim=False`` makes a node that submits and follows jobs but runs none. With
    ``listen`` (the default) the node hears the store's notices (PostgreSQL
    LISTEN/NOTIFY): streams of jobs running elsewhere, cancels and new jobs reach it as
    they are committed, and polling is only a safety net; ``listen=False`` polls.
    ``task_status.started()`` hands out the :class:`SharedRunner` (its ``follow`` loads
    a job created elsewhere).
    """
    store = shared_store(registry.store)
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError("max_concurrent must be >= 1 or None")
    # Persistence must outlive this node's jobs (their final states are written after
    # they end) and the loop using the store: it is shielded from the caller's cancel
    # and stopped explicitly once both are done.
    persistence = trio.CancelScope(shield=True)

    async def persist(task_status: trio.TaskStatus[Persister]) -> None:
        with persistence:
            await run_persistence(registry, task_status=task_status)

    async with trio.open_nursery() as outer:
        backing = registry.backing
        if backing is None:
            await outer.start(persist)
            backing = registry.backing
        if not isinstance(backing, StoreBacking):
            raise RuntimeError("the registry is persisted by something else")
        if not registry._sweeping:
            registry._sweeping = True
            outer.start_soon(sweep, registry)
        shared = SharedRunner(
            registry,
            store,
            backing.persister,
            executor,
            max_concurrent=max_concurrent,
            poll_interval=poll_interval,
            lease=lease,
            claim=claim,
            listen=listen,
        )
        backing.shared = shared
        try:
            async with trio.open_nursery() as jobs:
                task_status.started(shared)
                await shared.run(jobs)
        finally:
            backing.shared = None
            registry.remove_observer(shared._observe)
            persistence.cancel()
