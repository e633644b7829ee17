"""A cheap HTTP/1.1 load client on raw sockets, for measuring servers rather than clients.

Every request is written with one ``send`` (so no server is judged through a client's
Nagle / delayed-ACK stall), sockets have ``TCP_NODELAY``, and many clients share one
process: each is a generator that yields ``(socket, epoll events)`` when it must wait,
driven by one ``epoll`` loop (:func:`drive`). No HTTP library, no event loop framework:
per job the client costs a few syscalls and a few string operations.

A job is ``POST /v1/jobs`` and then ``GET`` its stream to the end (``two-step``), or one
``POST`` with ``Accept: text/event-stream`` (``one-call``, trio-jobs only). On ``fresh``
connections every request opens a connection of its own; ``keep`` reuses one per client.

Run as a child process: ``python -m benchmarks._rawclient HOST PORT SPEC_JSON``; it prints
one JSON line (jobs done, events seen, latencies, its own CPU seconds).
"""

from __future__ import annotations

import contextlib
import gc
import json
import select
import socket
import sys
import time
from collections.abc import Generator
from typing import Any

now = time.perf_counter

Wait = tuple[socket.socket, int]
READ = select.EPOLLIN
WRITE = select.EPOLLOUT

JOB_BODY = b'{"n": 10, "delay": 0}'


class Refused(Exception):
    """The server answered something else than the scenario expects."""


def request(
    method: str, path: str, host: str, body: bytes = b"", headers: tuple[str, ...] = ()
) -> bytes:
    """The bytes of one HTTP/1.1 request (written with one send)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def connect(addr: tuple[str, int]) -> Generator[Wait, None, socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    if err not in (0, 115):  # EINPROGRESS
        sock.close()
        raise OSError(err, "connect failed")
    if err:
        yield sock, WRITE
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            raise OSError(err, "connect failed")
    return sock


def _more(sock: socket.socket, buf: bytearray) -> Generator[Wait, None, None]:
    while True:
        yield sock, READ
        try:
            data = sock.recv(262144)
        except BlockingIOError:
            continue
        if not data:
            raise EOFError("the server closed the connection")
        buf += data
        return


def response(
    sock: socket.socket, buf: bytearray, head_only: bool = False
) -> Generator[Wait, None, tuple[int, bytes, bool]]:
    """Read one response: ``(status, body, connection closes)``. ``buf`` holds bytes read
    past the previous response (kept-alive connections)."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        yield from _more(sock, buf)
    lines = buf[:end].decode("latin-1").lower().split("\r\n")
    del buf[: end + 4]
    status = int(lines[0].split(" ", 2)[1])
    length = -1
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            close = "close" in value
    if head_only:
        return status, b"", close
    if chunked:
        body = bytearray()
        while True:
            while (eol := buf.find(b"\r\n")) < 0:
                yield from _more(sock, buf)
            size = int(buf[:eol].split(b";", 1)[0], 16)
            need = eol + size + 4
            while len(buf) < need:
                yield from _more(sock, buf)
            body += buf[eol + 2 : eol + 2 + size]
            del buf[:need]
            if size == 0:
                return status, bytes(body), close
    if length >= 0:
        while len(buf) < length:
            yield from _more(sock, buf)
        body_bytes = bytes(buf[:length])
        del buf[:length]
        return status, body_bytes, close
    while True:  # read to the end of the connection
        try:
            yield from _more(sock, buf)
        except EOFError:
            body_bytes = bytes(buf)
            buf.clear()
            return status, body_bytes, True


def _job_id(body: bytes) -> str:
    start = body.index(b'"job_id":') + 9
    start = body.index(b'"', start) + 1
    return body[start : body.index(b'"', start)].decode()


def job_loop(
    addr: tuple[str, int], spec: dict[str, Any], stats: dict[str, Any]
) -> Generator[Wait, None, None]:
    """One client: jobs back to back until ``spec["stop_at"]`` or ``spec["max_jobs"]``."""
    host = f"{addr[0]}:{addr[1]}"
    keep = spec["keep"]
    one_call = spec["one_call"]
    post_only = spec.get("post_only", False)
    body = spec.get("body", JOB_BODY.decode()).encode()
    stop_at = spec["stop_at"]
    max_jobs = spec.get("max_jobs", 1 << 62)
    extra = tuple(spec.get("headers", ()))
    post = request("POST", "/v1/jobs", host, body, extra)
    post_sse = request("POST", "/v1/jobs", host, body, ("Accept: text/event-stream", *extra))
    latencies: list[float] = stats["latencies"]
    sock: socket.socket | None = None
    buf = bytearray()
    done = 0

    def exchange(data: bytes) -> Generator[Wait, None, tuple[int, bytes]]:
        nonlocal sock
        if sock is None:
            sock = yield from connect(addr)
            buf.clear()
        if sock.send(data) != len(data):
            raise Refused("a request did not fit one send")
        status, content, close = yield from response(sock, buf)
        if close or not keep:
            sock.close()
            sock = None
        return status, content

    while done < max_jobs and now() < stop_at:
        start = now()
        if one_call:
            status, content = yield from exchange(post_sse)
            if status != 200:
                raise Refused(f"one-call POST answered {status}: {content[:200]!r}")
        else:
            status, content = yield from exchange(post)
            if status != 201:
                raise Refused(f"POST answered {status}: {content[:200]!r}")
            if post_only:
                latencies.append(now() - start)
                done += 1
                continue
            get = request("GET", f"/v1/jobs/{_job_id(content)}/stream", host, b"", extra)
            status, content = yield from exchange(get)
            if status != 200:
                raise Refused(f"GET stream answered {status}: {content[:200]!r}")
        if not content.rstrip().endswith(b"data: [DONE]"):
            raise Refused(f"the stream did not end with [DONE]: {content[-80:]!r}")
        latencies.append(now() - start)
        stats["events"] += content.count(b"\ndata: ") + content.startswith(b"data: ")
        done += 1
    stats["jobs"] += done
    if sock is not None:
        sock.close()


def drive(clients: list[Generator[Wait, None, None]]) -> None:
    """Run client generators to their end on one epoll loop."""
    poll = select.epoll()
    registered: dict[int, tuple[socket.socket, int]] = {}
    waiting: dict[int, Generator[Wait, None, None]] = {}

    def step(gen: Generator[Wait, None, None]) -> None:
        try:
            sock, events = next(gen)
        except StopIteration:
            return
        fd = sock.fileno()
        known = registered.get(fd)
        if known is None or known[0] is not sock:
            if known is not None:  # the fd was reused: the old socket is closed
                with contextlib.suppress(OSError):
                    poll.unregister(fd)
            poll.register(fd, events)
            registered[fd] = (sock, events)
        elif known[1] != events:
            poll.modify(fd, events)
            registered[fd] = (sock, events)
        waiting[fd] = gen

    for client in clients:
        step(client)
    while waiting:
        for fd, _ in poll.poll():
            ready = waiting.pop(fd, None)
            if ready is not None:
                step(ready)
            else:  # a closed socket's stale registration
                with contextlib.suppress(OSError):
                    poll.unregister(fd)
                registered.pop(fd, None)
    poll.close()


def run(addr: tuple[str, int], spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["clients"]`` job loops; wait until ``spec["start_at"]`` (wall clock) to
    begin, so that several client processes start together."""
    gc.disable()
    stats: dict[str, Any] = {"jobs": 0, "events": 0, "latencies": []}
    delay = spec["start_at"] - time.time()
    if delay > 0:
        time.sleep(delay)
    cpu0 = time.process_time()
    start = now()
    spec = {**spec, "stop_at": start + spec["seconds"]}
    drive([job_loop(addr, spec, stats) for _ in range(spec["clients"])])
    stats["wall"] = now() - start
    stats["cpu"] = time.process_time() - cpu0
    return stats


def main() -> None:
    host, port, spec = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    try:
        result = run((host, port), spec)
    except Exception as exc:  # reported to the parent, which fails the run
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
