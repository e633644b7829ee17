"""LISTEN/NOTIFY on PostgreSQL under trio: libpq's non-blocking API (``psycopg.pq``) with
``trio.lowlevel.wait_readable`` on the connection's socket (psycopg's async API needs
asyncio). How queens sharing a store hear at once that a job's rows changed or that its
cancel was asked, instead of polling for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from psycopg.pq.abc import PGconn

__all__ = ["RESYNC", "Notifier", "listen", "notify_calls"]

logger = logging.getLogger("trio_jobs.store")

RESYNC = "*"
"""Delivered after every (re)connection: notifications may have been missed meanwhile."""

_IDLE = 5.0
"""Seconds without traffic after which the connection is checked (a server gone without
closing the socket would otherwise never be noticed)."""


class _Broken(Exception):
    """The connection failed (or a statement on it did): it is closed, make a new one."""


async def _connect(dsn: str) -> PGconn:
    from psycopg import pq

    pgconn: PGconn = pq.PGconn.connect_start(dsn.encode())
    try:
        while True:
            status = pgconn.connect_poll()
            if status == pq.PollingStatus.OK:
                pgconn.nonblocking = 1
                return pgconn
            if status == pq.PollingStatus.READING:
                await trio.lowlevel.wait_readable(pgconn.socket)
            elif status == pq.PollingStatus.WRITING:
                await trio.lowlevel.wait_writable(pgconn.socket)
            else:
                raise _Broken(f"connect: {pgconn.get_error_message() or 'failed'}")
    except BaseException:
        pgconn.finish()
        raise


async def _query(pgconn: PGconn, sql: bytes, params: list[bytes | None] | None = None) -> None:
    """Run one statement to completion (its results are discarded; errors raise)."""
    from psycopg import pq

    if params is None:
        pgconn.send_query(sql)
    else:
        pgconn.send_query_params(sql, params)
    while pgconn.flush():
        await trio.lowlevel.wait_writable(pgconn.socket)
    failed = None
    while True:
        while pgconn.is_busy():
            await trio.lowlevel.wait_readable(pgconn.socket)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            break
        if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            failed = (result.error_message or b"").decode(errors="replace")
    if failed is not None:
        raise _Broken(f"{sql.decode()}: {failed}")


async def _session(
    dsn: str, listen_sql: bytes, deliver: Callable[[str], None], up: Callable[[], None]
) -> None:
    with trio.fail_after(_IDLE):
        pgconn = await _connect(dsn)
    try:
        with trio.fail_after(_IDLE):
            await _query(pgconn, listen_sql)
        up()
        deliver(RESYNC)
        while True:
            with trio.move_on_after(_IDLE) as idle:
                await trio.lowlevel.wait_readable(pgconn.socket)
            if idle.cancelled_caught:
                with trio.fail_after(_IDLE):
                    await _query(pgconn, b"SELECT 1")  # still there?
            else:
                pgconn.consume_input()
            while (notice := pgconn.notifies()) is not None:
                deliver(notice.extra.decode(errors="replace"))
    finally:
        pgconn.finish()


def notify_calls(first: int, count: int) -> str:
    """``pg_notify($1, $first), ...``: ``count`` notices on the channel in ``$1``."""
    return ", ".join(f"pg_notify($1, ${first + i})" for i in range(count))


class Notifier:
    """Runs statements at once on a connection of its own driven from trio (no worker
    thread, no wait behind the store's other statements): how notices go out, in one
    round trip for any number of them. Connected on first use and again after a
    failure; a statement that fails raises (notices are best effort: callers keep a
    safety net)."""

    def __init__(self, dsn: str, channel: str) -> None:
        self.dsn = dsn
        self.channel = channel
        self._pgconn: PGconn | None = None
        self._lock = trio.Lock()

    async def send(self, payloads: list[str]) -> None:
        """Notify every payload on the channel (in one statement, so in one commit)."""
        if not payloads:
            await trio.lowlevel.checkpoint()
            return
        await self.execute(f"SELECT {notify_calls(2, len(payloads))}", [self.channel, *payloads])

    async def execute(self, sql: str, params: Sequence[str]) -> None:
        """Run one statement (autocommit) with text parameters ``$1``, ``$2``...; its
        result is discarded. Raises ``_Broken`` (an error of the statement or of the
        connection), ``OperationalError``, ``OSError`` or ``trio.TooSlowError``."""
        from psycopg import OperationalError

        encoded: list[bytes | None] = [p.encode() for p in params]
        async with self._lock:
            # A connection that was idle may have been closed meanwhile (a server
            # restart): its failure is retried once on a new one. Every statement sent
            # here may run twice (notices are idempotent for their receivers).
            tries = 2 if self._pgconn is not None else 1
            for attempt in range(tries):
                try:
                    with trio.fail_after(_IDLE):
                        if self._pgconn is None:
                            self._pgconn = await _connect(self.dsn)
                        await _query(self._pgconn, sql.encode(), encoded)
                    return
                except (_Broken, OperationalError, OSError):
                    self.close()
                    if attempt == tries - 1:
                        raise
                except BaseException:
                    self.close()
                    raise

    def close(self) -> None:
        pgconn, self._pgconn = self._pgconn, None
        if pgconn is not None:
            pgconn.finish()


async def listen(
    dsn: str,
    listen_sql: bytes,
    deliver: Callable[[str], None],
    *,
    on_state: Callable[[bool], None] = lambda up: None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forever: hold a connection running ``listen_sql`` (a ``LISTEN``) and hand every
    notification's payload to ``deliver`` as it arrives, then :data:`RESYNC` after each
    (re)connection. A lost connection (a server restart) is opened again with backoff
    (up to 5 s); ``on_state`` tells whether the listener is connected.
    ``task_status.started()`` once the first LISTEN is in place (or failed once)."""
    from psycopg import OperationalError

    started = False
    backoff = 0.05

    def up() -> None:
        nonlocal started, backoff
        backoff = 0.05
        on_state(True)
        if not started:
            started = True
            task_status.started()

    while True:
        try:
            await _session(dsn, listen_sql, deliver, up)
        except (_Broken, OperationalError, OSError, trio.TooSlowError) as exc:
            on_state(False)
            logger.debug("listener lost its connection (%s); reconnecting", exc)
        if not started:
            started = True
            task_status.started()
        await trio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)
