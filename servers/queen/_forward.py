"""Forwarding one queen job to another daemon's job and re-narrating what it says."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import trio

from trio_jobs import (
    HTTPStatusError,
    InvalidJobState,
    JobCancelled,
    JobClient,
    JobEventStream,
    JobFailed,
    JobNotFound,
    JobRegistry,
    JobTimeout,
    NarrationEvent,
    StreamEndedWithoutSignal,
    TerminalSignal,
    TransportError,
    current_job_id,
    narrate,
    raise_for_signal,
)
from trio_jobs._client._client import default_ssl_context
from trio_jobs._client._transport import Http11Transport

__all__ = ["ForwardFailed", "forward_job"]

logger = logging.getLogger("servers.queen")


class ForwardFailed(Exception):
    """The forwarded job failed, or its daemon could not be reached; ``str`` says which.

    ``lost_contact`` is true when the daemon could not be reached or went away mid-job
    (as opposed to answering ``[ERROR]``). ``try_elsewhere`` is true when the daemon
    created no job (refused connection, reset or refusal with a 5xx before a job id came
    back): sending the same request to another daemon cannot run it twice.
    """

    def __init__(
        self, message: str, *, lost_contact: bool = False, try_elsewhere: bool = False
    ) -> None:
        super().__init__(message)
        self.lost_contact = lost_contact
        self.try_elsewhere = try_elsewhere


Watch = Callable[[], Awaitable[str]]
"""Returns (with the reason, e.g. ``no heartbeat for 5s``) once the daemon is known lost."""


_POOL_LIMITS = httpx.Limits(
    max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0
)
"""Kept-alive connections to one daemon. Idle ones are dropped after 2 s, before the
daemon's own keep-alive timeout (hypercorn: 5 s) could close one as a request goes out."""


class _Activity:
    """When bytes of one forward's requests last came in (keep-alive comments included)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = trio.current_time()

    def touch(self) -> None:
        self.last = trio.current_time()


_activity: contextvars.ContextVar[_Activity | None] = contextvars.ContextVar(
    "forward_activity", default=None
)
"""The activity of the forward whose task (or a task it started) makes a request."""

_SPARE_REFRESH_S = 1.0
"""How often the spare connection to a daemon streaming to us is used (well within the
pool's keep-alive expiry)."""

_SPARE_AFTER_OPEN_S = 0.02
"""How long after a stream opens the pool is looked at (the stream may have taken the
spare): a short job is over by then and gave its connection back. Only when no connection
is idle then is one made ready (a request), so jobs run one after another cost none."""

_DROP_AFTER_S = 2.0
"""A daemon no forward used for this long is forgotten with its pool (whose connections
have expired by then)."""

_daemons: trio.lowlevel.RunVar[dict[str, _Daemon]] = trio.lowlevel.RunVar("forward_daemons")


class _Daemon:
    """The kept-alive connections to one daemon, shared by every forward to it in this run
    (trio run).

    A fresh transport per forward cost a TCP connect and ~20 ms building its TLS context
    (loading the CA bundle) on every job's first token. Each open stream holds one of the
    pool's connections for its job's whole life, so a request sent meanwhile (the DELETE
    of a cancel) would find none idle and connect first: milliseconds on the path of a
    cancel on a loaded machine. So while streams are open a spare connection is kept:
    a ``HEAD /health`` through the pool leaves one idle, sent shortly after a stream opens
    (it may have taken the spare) if none is idle then, and every ``_SPARE_REFRESH_S``
    (which keeps the idle one from expiring). A daemon that no forward used
    for ``_DROP_AFTER_S`` (gone, or just idle) is dropped with its pool and clients.

    Its :class:`JobClient` (one per token and reconnect policy) is kept too: building one
    per forward cost ~0.2 ms of every job's first token.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.transport = Http11Transport(verify=default_ssl_context(), limits=_POOL_LIMITS)
        self.users = 0
        """Forwards to this daemon under way."""
        self.streams = 0
        """Their open streams (each holding a connection)."""
        self.refreshes = 0
        """Requests sent to keep the spare connection."""
        self.clients: dict[tuple[str | None, int], JobClient] = {}
        self._idle_since = trio.current_time()
        self._refresh_at = 0.0
        self._look_at = math.inf
        self._nap = trio.CancelScope()
        """:meth:`keep`'s sleep: a forward moves its deadline earlier instead of waking it
        (no task wakes on a job's path to its first token)."""

    def _wake_at(self, when: float) -> None:
        self._nap.deadline = min(self._nap.deadline, when)

    def enter(self) -> None:
        self.users += 1

    def leave(self) -> None:
        self.users -= 1
        if not self.users:
            self._idle_since = trio.current_time()
            self._wake_at(self._idle_since + _DROP_AFTER_S)

    def stream_opened(self) -> None:
        self.streams += 1
        self._look_at = min(self._look_at, trio.current_time() + _SPARE_AFTER_OPEN_S)
        self._wake_at(self._look_at)

    def stream_closed(self) -> None:
        self.streams -= 1

    async def client(self, token: str | None, max_reconnects: int) -> JobClient:
        """The client of this daemon for ``token`` and ``max_reconnects`` (made and
        entered on first use)."""
        key = (token, max_reconnects)
        client = self.clients.get(key)
        if client is None:
            client = JobClient(
                self.base_url,
                token=token,
                timeout=5.0,
                max_reconnects=max_reconnects,
                backoff_s=0.1,
                transport=_ActivityTransport(self.transport),
            )
            self.clients[key] = client
            await client.__aenter__()
        return client

    async def keep(self, daemons: dict[str, _Daemon]) -> None:
        """A system task: keeps the spare connection while streams are open, and drops
        this daemon from ``daemons`` (closing its pool) once unused for ``_DROP_AFTER_S``
        or when the run ends (system tasks are cancelled then)."""
        try:
            while True:
                now = trio.current_time()
                if not self.streams:
                    self._look_at = math.inf
                elif now >= self._refresh_at or (
                    now >= self._look_at and not self.transport.has_idle(self.base_url)
                ):
                    await self._use_spare()
                    self._refresh_at = trio.current_time() + _SPARE_REFRESH_S
                    self._look_at = math.inf
                elif now >= self._look_at:
                    self._look_at = math.inf
                if self.streams:
                    until = min(self._refresh_at, self._look_at)
                elif self.users:
                    until = math.inf
                else:
                    until = self._idle_since + _DROP_AFTER_S
                    if trio.current_time() >= until:
                        break
                self._nap = trio.CancelScope(deadline=until)
                with self._nap:
                    await trio.sleep_forever()
        finally:
            if daemons.get(self.base_url) is self:
                del daemons[self.base_url]
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                for client in self.clients.values():
                    with contextlib.suppress(Exception):
                        await client.aclose()
                with contextlib.suppress(Exception):
                    await self.transport.aclose()

    async def _use_spare(self) -> None:
        """One ``HEAD /health``: an idle connection is there afterwards (the one it found
        or the one it opened). Failures are the forwards' business: only logged."""
        self.refreshes += 1
        request = httpx.Request("HEAD", f"{self.base_url}/health")
        with trio.move_on_after(_SPARE_REFRESH_S):
            try:
                response = await self.transport.handle_async_request(request)
                await response.aread()  # to its (empty) end, or the connection is closed
                await response.aclose()
            except Exception as exc:
                logger.debug("keeping a connection to %s: %s", self.base_url, exc)


def _daemon(base_url: str) -> _Daemon:
    """The daemon at ``base_url`` (see :class:`_Daemon`), made on first use."""
    try:
        daemons = _daemons.get()
    except LookupError:
        daemons = {}
        _daemons.set(daemons)
    daemon = daemons.get(base_url)
    if daemon is None:
        daemon = daemons[base_url] = _Daemon(base_url)
        trio.lowlevel.spawn_system_task(daemon.keep, daemons, name=f"forward pool {base_url}")
    return daemon


class _ActivityTransport(httpx.AsyncBaseTransport):
    """A daemon's shared pool, telling the activity of the forward making a request about
    every chunk that comes in. Closing it leaves the pool open."""

    def __init__(self, pool: httpx.AsyncBaseTransport) -> None:
        self._inner = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        activity = _activity.get()
        if activity is not None:
            activity.touch()
            assert isinstance(response.stream, httpx.AsyncByteStream)
            response.stream = _TouchingStream(response.stream, activity)
        return response

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _TouchingStream(httpx.AsyncByteStream):
    """A response body that tells an activity about every chunk it yields."""

    def __init__(self, inner: httpx.AsyncByteStream, owner: _Activity) -> None:
        self._inner = inner
        self._owner = owner
        self._chunks: AsyncIterator[bytes] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        self._chunks = self._inner.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        assert self._chunks is not None
        chunk = await self._chunks.__anext__()
        self._owner.touch()
        return chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _silence(activity: _Activity, silence_s: float) -> str:
    """Return once nothing (no event, no keep-alive) came in for ``silence_s`` seconds."""
    activity.touch()
    while True:
        left = activity.last + silence_s - trio.current_time()
        if left <= 0:
            return f"no event or keep-alive for {silence_s:g}s"
        await trio.sleep(left)


async def forward_job(
    registry: JobRegistry,
    base_url: str,
    body: dict[str, Any],
    *,
    what: str,
    token: str | None = None,
    cancel_timeout_s: float = 3.0,
    max_reconnects: int = 2,
    watch: Watch | None = None,
    silence_s: float | None = None,
) -> str:
    """Run ``body`` as a job on the daemon at ``base_url`` as part of the current job.

    Each event of the remote job is narrated again into the current job (keeping its actor
    and fields). The remote outcome decides ours: ``[DONE]`` returns the remote job id,
    ``[ERROR] msg`` raises :class:`ForwardFailed` with the same message, ``[CANCELLED]``
    cancels the current job. The current job's remaining deadline is sent as the remote
    ``timeout_s``, so both enforce the same timeout, and ``on_disconnect: cancel``, so a
    queen that dies does not leave the remote job running.

    Contact: when ``watch`` returns (the daemon stopped heartbeating) or, once the remote
    job exists, nothing at all (no event, no keep-alive) came from it for ``silence_s``
    seconds, the job fails with ``lost <what> at <url>: <reason>`` (``lost_contact``).

    Cancellation: when the current job is cancelled (or times out) before the remote job
    ended, a ``DELETE`` of the remote job is sent as soon as the cancel reaches the relay
    (on the pool's spare connection, before the stream's teardown) in a shielded cleanup
    bounded by ``cancel_timeout_s``, then ``Cancelled`` propagates. A daemon found lost by ``watch``
    gets no ``DELETE`` (it would not answer); the dropped stream cancels its job
    (``on_disconnect``) if it ever wakes up.
    """
    # The remote job belongs to this one: if the queen goes away (its stream drops for
    # good), the remote daemon cancels it instead of running it for nobody.
    options: dict[str, Any] = {"on_disconnect": "cancel"}
    deadline = trio.current_effective_deadline()
    if deadline != math.inf:
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            await trio.lowlevel.checkpoint()
        options["timeout_s"] = max(round(remaining, 3), 0.001)
    activity = _Activity()
    lost: str | None = None
    presumed_dead = False  # found lost by ``watch``: no DELETE, it would not answer
    failure: ForwardFailed | None = None
    remote_id: str | None = None
    terminal: TerminalSignal | None = None
    contact = trio.CancelScope()

    async def until_lost(watcher: Watch, dead: bool) -> None:
        nonlocal lost, presumed_dead
        reason = await watcher()
        if lost is None:
            lost, presumed_dead = reason, dead
        contact.cancel()

    daemon = _daemon(base_url)
    daemon.enter()
    # The forward's requests (made by this task and those it starts) tell ``activity``.
    reset = _activity.set(activity)
    try:
        client = await daemon.client(token, max_reconnects)

        async def work(watchers: trio.Nursery) -> None:
            nonlocal remote_id, terminal, failure
            with contact:
                try:
                    # One request creates the remote job and opens its stream (a round
                    # trip less than submit, then stream). If it drops before the job's id
                    # came back, the remote job (on_disconnect: cancel) is cancelled there.
                    async with client.submit_stream(body, **options) as events:
                        remote_id = events.job_id
                        assert remote_id is not None
                        daemon.stream_opened()
                        try:
                            narrate(
                                "forward",
                                f"Forwarded {body.get('operation')} to {what} as {remote_id}",
                                target=base_url,
                                remote_job_id=remote_id,
                            )
                            if silence_s is not None:
                                silent = partial(_silence, activity, silence_s)
                                watchers.start_soon(until_lost, silent, False)
                            terminal = await _relay(events, what)
                        finally:
                            daemon.stream_closed()
                            if terminal is None and not presumed_dead:
                                # Before the stream's teardown (on the spare
                                # connection): the remote job stops that much sooner.
                                await _cancel_remote(client, remote_id, what, cancel_timeout_s)
                    if terminal is None:
                        raise StreamEndedWithoutSignal("the stream ended without a signal")
                except HTTPStatusError as exc:
                    failure = ForwardFailed(
                        f"{what} at {base_url} refused the job: {exc}",
                        try_elsewhere=remote_id is None and exc.status_code >= 500,
                    )
                except StreamEndedWithoutSignal as exc:
                    failure = ForwardFailed(
                        f"lost {what} at {base_url} before the job ended: {exc}",
                        lost_contact=True,
                    )
                except TransportError as exc:
                    if remote_id is None:
                        failure = ForwardFailed(
                            f"{what} at {base_url} is unreachable: {exc}",
                            lost_contact=True,
                            try_elsewhere=True,
                        )
                    else:
                        failure = ForwardFailed(
                            f"lost {what} at {base_url}: {exc}", lost_contact=True
                        )
            watchers.cancel_scope.cancel()

        async with trio.open_nursery() as watchers:
            if watch is not None:
                watchers.start_soon(until_lost, watch, True)
            # In this task, not a child: the request goes out without waiting for the
            # scheduler to start one (on every forwarded job's path to its first token).
            await work(watchers)
        if lost is not None and terminal is None:
            logger.warning("lost %s at %s: %s", what, base_url, lost)
            raise ForwardFailed(
                f"lost {what} at {base_url}: {lost}",
                lost_contact=True,
                try_elsewhere=remote_id is None,
            )
        if failure is not None:
            raise failure
        assert terminal is not None
        assert remote_id is not None
        try:
            raise_for_signal(terminal, remote_id)
        except JobTimeout as exc:
            # Our own deadline is the same instant give or take the network: let it fire
            # so the queen job reports its own timeout; fail with the remote text otherwise.
            with trio.move_on_after(1.0):
                await trio.sleep_forever()
            raise ForwardFailed(exc.message) from None
        except JobFailed as exc:
            raise ForwardFailed(exc.message) from None
        except JobCancelled:
            job_id = current_job_id()
            narrate("forward_cancelled", f"{what} cancelled job {remote_id}")
            if job_id is not None and registry.cancel_job(job_id, f"cancelled on {what}"):
                await trio.sleep_forever()
            raise ForwardFailed(f"{what} cancelled job {remote_id}") from None
        return remote_id
    finally:
        _activity.reset(reset)
        daemon.leave()


async def _relay(events: JobEventStream, what: str) -> TerminalSignal | None:
    """Narrate the remote job's events into the current job; its terminal signal, or None
    when the stream ended without one."""
    terminal: TerminalSignal | None = None
    while terminal is None:
        try:
            item = await events.receive()
        except trio.EndOfChannel:
            break
        # Re-narrate everything that already arrived without a trip through the scheduler
        # per event (the batching lever in PITFALLS).
        while True:
            if isinstance(item, NarrationEvent):
                narrate(item.action, item.human, actor=item.actor, **item.fields)
            else:
                terminal = item
            try:
                item = events.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
    if terminal is not None:  # read to the end of the body (keeps the pool)
        async for _ in events:
            logger.warning("%s sent an item after its terminal signal", what)
    return terminal


async def _cancel_remote(client: JobClient, remote_id: str, what: str, timeout_s: float) -> None:
    """DELETE the remote job; shielded and bounded, failures only logged."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout_s) as scope:
        try:
            await client.cancel(remote_id)
            logger.debug("cancelled %s job %s", what, remote_id)
            narrate("forward_cancel", f"Cancelled job {remote_id} on {what}")
        except (InvalidJobState, JobNotFound):
            logger.debug("%s job %s had already finished", what, remote_id)
        except TransportError as exc:
            logger.warning("could not cancel %s job %s: %s", what, remote_id, exc)
    if scope.cancelled_caught:
        logger.warning("cancelling %s job %s took over %.1fs", what, remote_id, timeout_s)
