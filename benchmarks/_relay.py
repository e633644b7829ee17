"""The floor of a hop: an HTTP/1.1 relay on trio and h11 that does nothing else.

``python -m benchmarks._relay HOST PORT`` prints ``listening on http://127.0.0.1:N`` and
passes every request on a connection to ``HOST:PORT`` (one kept upstream connection per
client connection) and the answer back as it comes, chunk by chunk: no job, no parsing
of the body, no scheduling. Two of them in a chain are what two daemon hops cost on this
machine before any of the daemons' own work (:mod:`benchmarks.bench_openai`).
"""

from __future__ import annotations

import contextlib
import sys

import h11
import trio

_SKIP = (b"host", b"content-length", b"transfer-encoding", b"connection")


async def _next(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(65536)))


async def _relay(client: trio.abc.Stream, host: str, port: int) -> None:
    server_side = h11.Connection(h11.SERVER)
    upstream = await trio.open_tcp_stream(host, port)
    up = h11.Connection(h11.CLIENT)
    async with upstream:
        while True:
            request = await _next(server_side, client)
            if not isinstance(request, h11.Request):
                return
            body = b""
            while not isinstance(event := await _next(server_side, client), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    body += event.data
            headers = [(k, v) for k, v in request.headers if k not in _SKIP]
            head = [(b"host", f"{host}:{port}".encode()), (b"content-length", b"%d" % len(body))]
            out = up.send(
                h11.Request(method=request.method, target=request.target, headers=head + headers)
            )
            await upstream.send_all(
                out + up.send(h11.Data(data=body)) + up.send(h11.EndOfMessage())
            )  # type: ignore[operator]
            while True:
                event = await _next(up, upstream)
                if isinstance(event, h11.Response):
                    kept = [(k, v) for k, v in event.headers if k not in _SKIP]
                    kept.append((b"transfer-encoding", b"chunked"))
                    answer = h11.Response(status_code=event.status_code, headers=kept)
                    await client.send_all(server_side.send(answer))  # type: ignore[arg-type]
                elif isinstance(event, h11.Data):
                    await client.send_all(server_side.send(h11.Data(data=bytes(event.data))))  # type: ignore[arg-type]
                elif isinstance(event, h11.EndOfMessage):
                    await client.send_all(server_side.send(h11.EndOfMessage()))  # type: ignore[arg-type]
                    break
                else:
                    return
            up.start_next_cycle()
            server_side.start_next_cycle()


async def main(host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(f"listening on http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", flush=True)

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, h11.ProtocolError):
            await _relay(stream, host, port)

    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
