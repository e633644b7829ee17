"""The coalescing transport: a request's head and its first body chunk leave in one write.

Checked on a recording stream (the exact writes) and on a real socket (a raw trio server
sees a whole ``POST`` in its first read, and the answers come back as httpx's would).
"""

from __future__ import annotations

import json
from typing import Any

import httpcore
import httpx
import trio

from trio_jobs._client._transport import _HeldHead, coalescing_transport


class _Recording(httpcore.AsyncNetworkStream):
    """A fake network stream: records writes, answers reads from a script."""

    def __init__(self, answers: list[bytes], fail_writes: bool = False) -> None:
        self.writes: list[bytes] = []
        self.answers = answers
        self.fail_writes = fail_writes

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_writes:
            raise httpcore.WriteError("peer closed")
        self.writes.append(buffer)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.answers.pop(0) if self.answers else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_head_waits_for_the_first_body_chunk_or_a_read() -> None:
    inner = _Recording([b"answer 1", b"answer 2"])
    stream = _HeldHead(inner)
    await stream.write(b"HEAD1 ")
    assert inner.writes == []
    await stream.write(b"body-a")
    await stream.write(b"body-b")  # a later chunk goes out as it comes
    assert inner.writes == [b"HEAD1 body-a", b"body-b"]
    assert await stream.read(100) == b"answer 1"
    await stream.write(b"HEAD2")  # no body: the read sends it
    assert inner.writes[2:] == []
    assert await stream.read(100) == b"answer 2"
    assert inner.writes[2:] == [b"HEAD2"]


async def test_a_head_that_cannot_be_written_still_lets_the_answer_be_read() -> None:
    """As httpcore does with a body it could not write: the server's early answer (a
    413 before closing) is read, not hidden behind the write error."""
    stream = _HeldHead(_Recording([b"HTTP/1.1 413 ..."], fail_writes=True))
    await stream.write(b"HEAD")
    assert await stream.read(100) == b"HTTP/1.1 413 ..."


async def test_a_whole_post_arrives_in_one_read(nursery: trio.Nursery) -> None:
    first_reads: list[bytes] = []

    async def server(stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            if not buffer:
                first_reads.append(data)
            buffer += data
            head, sep, rest = buffer.partition(b"\r\n\r\n")
            if not sep:
                continue
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                continue
            buffer = rest[length:]
            body = json.dumps({"got": rest[:length].decode()}).encode()
            answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            answer += b"content-length: %d\r\n\r\n%s" % (len(body), body)
            await stream.send_all(answer)

    listeners = await nursery.start(trio.serve_tcp, server, 0)
    port = listeners[0].socket.getsockname()[1]
    payload: dict[str, Any] = {"operation": "infer", "prompt": "x" * 500}
    async with httpx.AsyncClient(transport=coalescing_transport()) as client:
        for _ in range(3):  # the same kept-alive connection each time
            response = await client.post(f"http://127.0.0.1:{port}/v1/jobs", json=payload)
            assert json.loads(response.json()["got"]) == payload
        response = await client.get(f"http://127.0.0.1:{port}/health")
        assert response.status_code == 200
    assert len(first_reads) == 4
    for data in first_reads[:3]:  # head and body together
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/jobs") and json.loads(body) == payload
    assert first_reads[3].startswith(b"GET /health")
