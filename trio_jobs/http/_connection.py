"""hypercorn's trio worker with less scheduler work per connection and per request.

hypercorn's ``TCPServer`` (one per connection) keeps its keep-alive timer in a task of its
own: started when the connection opens, cancelled when a request arrives and started
again after each response, and left running (for ``keep_alive_timeout``) after the client
has closed. Every read is in a ``fail_after`` scope, and every write waits in a lock (two
scheduler trips) even when nobody else writes. Measured per job (POST + GET stream on
fresh connections) that is about a third of a trio-jobs server's scheduler work.

:class:`Connection` is that same ``TCPServer`` (its protocols, h11 and h2 and WebSocket,
and ASGI handling unchanged) with the keep-alive timer as the deadline of the one cancel
scope around its reads (no task), a lock taken without a trip when it is free, and each
request's messages in an :class:`Inbox` instead of a memory channel (no trip for a
message that is already there, none to hand one over while there is room).
:func:`worker_serve` is hypercorn's ``worker_serve`` for plain TCP listeners with this
connection class; what it promises is hypercorn's: lifespan startup before listening,
idle connections closed at once when the server stops, a graceful timeout for the rest.
Its accept loop is ``trio.serve_listeners``' without the second close of each connection.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, parse_socket_addr, raise_shutdown, repr_socket_addr

from ._http11 import Http11Connection, IdleDeadline, send_whole

__all__ = ["Connection", "worker_serve"]

logger = logging.getLogger("trio_jobs.http")
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class Inbox:
    """A request's ASGI messages from the connection to the app: hypercorn's memory
    channel (``max_app_queue_size``) without its cost. :meth:`put` waits only when the
    inbox is full (so a large body still slows the client), :meth:`receive` only when
    it is empty; neither makes a scheduler trip otherwise."""

    __slots__ = ("_capacity", "_items", "_readers", "_writers")

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._items: deque[Any] = deque()
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()

    async def put(self, message: Any) -> None:
        while len(self._items) >= self._capacity:
            await self._writers.park()
        self._items.append(message)
        self._readers.unpark()

    def receive_nowait(self) -> Any:
        """The next message; ``trio.WouldBlock`` when there is none."""
        if not self._items:
            raise trio.WouldBlock
        self._writers.unpark()
        return self._items.popleft()

    async def receive(self) -> Any:
        while not self._items:
            await self._readers.park()
        self._writers.unpark()
        return self._items.popleft()


class _Requests(TaskGroup):
    """hypercorn's per-connection task group, giving each request an :class:`Inbox`."""

    async def spawn_app(
        self,
        app: AppWrapper,
        config: Config,
        scope: Any,
        send: Callable[[Any], Awaitable[None]],
    ) -> Callable[[Any], Awaitable[None]]:
        inbox = Inbox(config.max_app_queue_size)
        assert self._nursery is not None
        self._nursery.start_soon(
            _handle,
            app,
            config,
            scope,
            inbox.receive,
            send,
            trio.to_thread.run_sync,
            trio.from_thread.run,
        )
        return inbox.put


class Connection(IdleDeadline, TCPServer):
    """One HTTP connection (plain TCP): hypercorn's ``TCPServer``, leaner (module doc).

    ``idle``: the server's set of idle connections, closed at once when it stops."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: LifespanState,
        stream: Any,
        *,
        idle: set[Any],
    ) -> None:
        super().__init__(app, config, context, state, stream)
        self._idle = idle
        self._reads = trio.CancelScope()
        self._closed = False

    async def run(self, preread: bytes = b"") -> None:
        """Serve the connection; ``preread``: bytes already read from it (a request
        :class:`~trio_jobs.http._http11.Http11Connection` hands over)."""
        socket = self.stream.socket
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with _Requests() as task_group:
                self._task_group = task_group
                self.protocol = ProtocolWrapper(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    False,
                    client,
                    server,
                    self.protocol_send,
                    "http/1.1",
                )
                await self.protocol.initiate()
                self._set_idle(True)
                if preread:
                    await self.protocol.handle(RawData(preread))
                await self._read_data()
        except OSError:
            pass
        finally:
            self._idle.discard(self)
            await self._close()

    async def _close(self) -> None:
        # hypercorn closes a connection the client closed first twice (on its Closed
        # event and on the way out): once is enough.
        if self._closed:
            return
        self._closed = True
        try:
            await super()._close()
        finally:
            self.stream.socket.close()  # closed even if the close was cancelled

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if event.data and not await send_whole(self.send_lock, self.stream, event.data):
                await self.protocol.handle(Closed())
        elif isinstance(event, Closed):
            await self._close()
            await self.protocol.handle(Closed())
        elif isinstance(event, Updated):
            self._set_idle(event.idle)

    async def _read_data(self) -> None:
        with self._reads:
            while True:
                try:
                    data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    break
        if self._reads.cancelled_caught:  # idle for the keep-alive timeout, or stopping
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()
            return
        await self.protocol.handle(Closed())


async def _accept(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Http11Connection],
    nursery: trio.Nursery,
) -> None:
    """``trio.serve_listeners`` for one listener, without its second close of every
    connection (a :class:`Connection` closes its own stream)."""
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                logger.error("accept failed (%s); retrying in 0.1 s", os.strerror(exc.errno))
                await trio.sleep(0.1)
            else:
                nursery.start_soon(handler(stream).run)


async def worker_serve(
    app: AppWrapper,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """hypercorn's ``trio.run.worker_serve`` for ``config.bind``'s plain TCP sockets,
    serving each connection with :class:`Connection`."""
    config.set_statsd_logger_class(StatsdLogger)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)
    idle: set[Connection | Http11Connection] = set()
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            listeners = []
            binds = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                bind = repr_socket_addr(sock.family, sock.getsockname())
                binds.append(f"http://{bind}")
                await config.log.info(f"Running on http://{bind} (CTRL + C to quit)")
            task_status.started(binds)
            state = ConnectionState(lifespan_state.copy())
            fallback = partial(Connection, app, config, context, state, idle=idle)
            handler = partial(
                Http11Connection, app, config, context, state, idle=idle, fallback=fallback
            )
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    for listener in listeners:
                        nursery.start_soon(_accept, listener, handler, server_nursery)
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                await context.terminated.set()
                for connection in list(idle):
                    connection.close_idle()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
