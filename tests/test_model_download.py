"""Model downloads into a hive's models directory, from a real HTTP server on 127.0.0.1.

The server is a small HTTP/1.1 file server on trio's TCP streams that honours ``Range``
(or ignores it, to check the restart path) and records the requests it saw.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from servers.hive import ModelStore
from servers.operations import ModelDownload
from trio_jobs import JobRegistry, execute_and_stream


@dataclass
class FileServer:
    """Serves ``files`` (path -> bytes); ``ranges`` False makes it ignore Range headers."""

    files: dict[str, bytes]
    ranges: bool = True
    cut_after: int | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        request_line, *header_lines = head.split("\r\n")
        _, path, _ = request_line.split(" ")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
        self.requests.append({"path": path, **headers})
        body = self.files.get(path)
        if body is None:
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        status, start = "200 OK", 0
        extra = ""
        if self.ranges and headers.get("range", "").startswith("bytes="):
            start = int(headers["range"][6:].split("-")[0])
            status = "206 Partial Content"
            extra = f"Content-Range: bytes {start}-{len(body) - 1}/{len(body)}\r\n"
        payload = body[start:]
        await stream.send_all(
            (
                f"HTTP/1.1 {status}\r\nContent-Length: {len(payload)}\r\n{extra}"
                "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        if self.cut_after is not None:
            await stream.send_all(payload[: self.cut_after])
            return
        for offset in range(0, len(payload), 65536):
            await stream.send_all(payload[offset : offset + 65536])

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            await self.handle(stream)

    async def run(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        task_status.started(self.url)
        await trio.serve_listeners(self._handle, listeners)


BLOB = bytes(range(256)) * 4096  # 1 MiB
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


async def _download(store: ModelStore, op: ModelDownload) -> tuple[list[dict[str, Any]], str]:
    """Run the download as a job; returns its events (as dicts) and its signal line."""

    async def executor(job_id: str, payload: Any) -> None:
        await store.download(op)

    events: list[dict[str, Any]] = []
    signal = ""
    async with execute_and_stream(JobRegistry(actor="hive"), executor, timeout=20) as lines:
        async for line in lines:
            if line.startswith("{"):
                events.append(json.loads(line))
            else:
                signal = line
    return events, signal


@pytest.fixture
async def server(nursery: trio.Nursery) -> FileServer:
    srv = FileServer({"/m.bin": BLOB})
    await nursery.start(srv.run)
    return srv


async def test_download_verifies_and_renames(server: FileServer, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, progress_interval_s=0.0)
    op = ModelDownload(model="m.bin", url=f"{server.url}/m.bin", sha256=BLOB_SHA)
    with trio.fail_after(10):
        events, signal = await _download(store, op)
    assert signal == "[DONE]"
    assert (tmp_path / "m.bin").read_bytes() == BLOB
    assert not (tmp_path / "m.bin.part").exists()
    progress = [e["progress"] for e in events if e["action"] == "download_progress"]
    assert progress, "no progress narration"
    assert progress[-1] == {"done": len(BLOB), "total": len(BLOB), "unit": "bytes"}
    assert all(p["unit"] == "bytes" for p in progress)
    last = [e for e in events if e["action"] == "download_progress"][-1]
    assert last["percent"] == 100.0 and "rate_bytes_s" in last
    assert store.list() == [
        {"id": "m.bin", "size": len(BLOB), "modified": (tmp_path / "m.bin").stat().st_mtime}
    ]
    info = await store.get("m.bin")
    assert info["sha256"] == BLOB_SHA


async def test_sha256_mismatch_fails_and_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    op = ModelDownload(model="m.bin", url=f"{server.url}/m.bin", sha256="0" * 64)
    with trio.fail_after(10):
        _, signal = await _download(store, op)
    assert signal.startswith("[ERROR] sha256 mismatch for m.bin")
    assert BLOB_SHA in signal
    assert list(tmp_path.iterdir()) == []


async def test_resume_sends_range_and_appends(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "m.bin.part").write_bytes(BLOB[:300_000])
    store = ModelStore(tmp_path)
    op = ModelDownload(model="m.bin", url=f"{server.url}/m.bin", sha256=BLOB_SHA)
    with trio.fail_after(10):
        events, signal = await _download(store, op)
    assert signal == "[DONE]"
    assert server.requests[-1]["range"] == "bytes=300000-"
    assert any(e["action"] == "download_resume" for e in events)
    assert (tmp_path / "m.bin").read_bytes() == BLOB
    assert not (tmp_path / "m.bin.part").exists()


async def test_server_ignoring_range_restarts(tmp_path: Path, nursery: trio.Nursery) -> None:
    srv = FileServer({"/m.bin": BLOB}, ranges=False)
    await nursery.start(srv.run)
    (tmp_path / "m.bin.part").write_bytes(b"garbage" * 100)
    store = ModelStore(tmp_path)
    op = ModelDownload(model="m.bin", url=f"{srv.url}/m.bin", sha256=BLOB_SHA)
    with trio.fail_after(10):
        events, signal = await _download(store, op)
    assert signal == "[DONE]"
    assert any(e["action"] == "download_restart" for e in events)
    assert (tmp_path / "m.bin").read_bytes() == BLOB


async def test_truncated_body_fails_without_partial_file(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    srv = FileServer({"/m.bin": BLOB}, cut_after=100_000)
    await nursery.start(srv.run)
    store = ModelStore(tmp_path)
    op = ModelDownload(model="m.bin", url=f"{srv.url}/m.bin")
    with trio.fail_after(10):
        _, signal = await _download(store, op)
    assert signal.startswith("[ERROR] download of m.bin")
    assert list(tmp_path.iterdir()) == []


async def test_http_404_is_an_error(server: FileServer, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    op = ModelDownload(model="x.bin", url=f"{server.url}/missing")
    with trio.fail_after(10):
        _, signal = await _download(store, op)
    assert signal == f"[ERROR] GET {server.url}/missing answered HTTP 404"
    assert list(tmp_path.iterdir()) == []


async def test_cancel_mid_download_leaves_no_partial_file(tmp_path: Path) -> None:
    gate = trio.Event()

    class SlowServer(FileServer):
        async def handle(self, stream: trio.SocketStream) -> None:
            await stream.receive_some(4096)
            await stream.send_all(
                f"HTTP/1.1 200 OK\r\nContent-Length: {len(BLOB)}\r\n\r\n".encode() + BLOB[:200_000]
            )
            gate.set()
            await trio.sleep_forever()

    store = ModelStore(tmp_path)
    async with trio.open_nursery() as nursery:
        srv = SlowServer({})
        await nursery.start(srv.run)
        op = ModelDownload(model="m.bin", url=f"{srv.url}/m.bin")

        async def executor(job_id: str, payload: Any) -> None:
            await store.download(op)

        registry = JobRegistry(actor="hive")
        with trio.fail_after(10):
            async with execute_and_stream(registry, executor) as lines:
                await gate.wait()
                while not (tmp_path / "m.bin.part").exists():
                    await trio.sleep(0.01)
                assert registry.cancel_job(lines.job_id)
                rest = [line async for line in lines]
            assert rest[-1] == "[CANCELLED]"
        nursery.cancel_scope.cancel()
    assert list(tmp_path.iterdir()) == []


async def test_model_store_get_delete_unknown(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"abc")
    (tmp_path / "b.gguf.part").write_bytes(b"ab")
    assert [m["id"] for m in store.list()] == ["a.gguf"]
    assert (await store.get("a.gguf"))["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert store.delete("a.gguf") == {"id": "a.gguf", "size": 3}
    with pytest.raises(LookupError, match=r"unknown model 'a\.gguf'"):
        store.delete("a.gguf")
    with pytest.raises(LookupError):
        await store.get("nope")


async def test_download_without_url_or_source(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _, signal = await _download(store, ModelDownload(model="m.bin"))
    assert (
        signal == "[ERROR] model_download of 'm.bin' needs a url (this hive has no --model-source)"
    )


async def test_a_second_download_of_the_same_model_is_refused(tmp_path: Path) -> None:
    started = trio.Event()

    class Stalling(FileServer):
        async def handle(self, stream: trio.SocketStream) -> None:
            await stream.receive_some(4096)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nxx")
            started.set()
            await trio.sleep_forever()

    store = ModelStore(tmp_path)
    async with trio.open_nursery() as nursery:
        srv = Stalling({})
        await nursery.start(srv.run)
        op = ModelDownload(model="m.bin", url=f"{srv.url}/m.bin")

        nursery.start_soon(store.download, op)
        with trio.fail_after(10):
            await started.wait()
            _, signal = await _download(store, op)
        assert signal == "[ERROR] m.bin is already being downloaded by another job"
        nursery.cancel_scope.cancel()
    assert list(tmp_path.iterdir()) == []
