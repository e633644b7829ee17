"""ASGI middleware: an answer given before the request body was read closes the connection.

When Quart answers before it has read the request's body (a 401 from the auth hook, a 404
or 405 from routing, to a request that has a body), hypercorn cannot reuse the connection:
the client's next request on it gets no answer (a keep-alive client such as requests or
httpx then waits for its read timeout). Such an answer gets ``Connection: close``, so the
client opens a new connection instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

__all__ = ["UnreadBodyGuard", "has_body"]

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


def has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether request headers announce a body (a non-zero length, or chunked)."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class UnreadBodyGuard:
    """Adds ``Connection: close`` to a response that starts before the request body was
    read to its end (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or not has_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        read = False

        async def receive_and_note() -> ASGIReceiveEvent:
            nonlocal read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                read = True
            return message

        async def send_closing_early(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and not read:
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive_and_note, send_closing_early)
