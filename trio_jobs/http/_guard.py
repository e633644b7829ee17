"""ASGI middleware between hypercorn and Quart that keeps keep-alive connections healthy.

Two interactions of hypercorn's HTTP/1.1 connections with quart-trio need it:

* An answer given before the request body was read (a 401 from the auth hook, a 404 or
  405 from routing, to a request that has a body) leaves the connection unusable: the
  client's next request on it gets no answer (a keep-alive client such as requests or
  httpx then waits for its read timeout). Such an answer gets ``Connection: close``, so
  the client opens a new connection instead.
* hypercorn starts a connection's keep-alive timer from inside the app's final send, and
  quart-trio cancels the request's tasks right then (the request is over): the timer was
  cancelled with them, so idle connections were never closed, neither after
  ``keep_alive_timeout`` nor on shutdown (where they held the stop for the whole grace
  period). The final send is shielded from that cancellation.

It also runs the request's end callbacks (:func:`on_request_end`) when the request is over,
however it ended: a client that leaves before Quart starts a response body never runs
that body's ``finally``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

__all__ = ["ConnectionGuard", "has_body", "on_request_end", "with_request_end"]

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

_ON_END = "trio_jobs.on_request_end"


def on_request_end(scope: Any, callback: Callable[[], None]) -> bool:
    """Call ``callback`` (synchronously, so also under cancellation) once the HTTP request
    of ``scope`` is over; False when the app runs without :class:`ConnectionGuard`."""
    callbacks = scope.get(_ON_END)
    if callbacks is None:
        return False
    callbacks.append(callback)
    return True


def with_request_end(scope: Any) -> tuple[Any, list[Callable[[], None]]]:
    """A copy of ``scope`` that :func:`on_request_end` adds callbacks to, and that list:
    the caller runs them once the request is over."""
    callbacks: list[Callable[[], None]] = []
    return {**scope, _ON_END: callbacks}, callbacks


def has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether request headers announce a body (a non-zero length, or chunked)."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class ConnectionGuard:
    """See the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        read = not has_body(scope["headers"])

        async def receive_and_note() -> ASGIReceiveEvent:
            nonlocal read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                read = True
            return message

        async def guarded_send(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and not read:
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True):
                    await send(message)
                return
            await send(message)

        ended, callbacks = with_request_end(scope)
        try:
            await self.app(cast(Scope, ended), receive_and_note, guarded_send)
        finally:
            for callback in callbacks:
                callback()
