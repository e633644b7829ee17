"""Model downloads into a hive's models directory, from a real HTTP server on 127.0.0.1.

The server is a small HTTP/1.1 file server on trio's TCP streams that honours ``Range``
(or ignores it, to check the restart path), optionally sends an ``ETag`` or
``Last-Modified`` and honours ``If-Range`` (or ignores it, as some servers do), can cut or
stall a body, and records the requests it saw. The last tests run real hive processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from pydantic import ValidationError

from servers.hive import DownloadError, ModelStore
from servers.operations import ModelDownload, parse_operation
from tests.daemons import Cluster
from trio_jobs import JobRegistry, execute_and_stream


@dataclass
class FileServer:
    """Serves ``files`` (path -> bytes); ``ranges`` False makes it ignore Range headers."""

    files: dict[str, bytes]
    ranges: bool = True
    cut_after: int | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    etag: bool = False
    last_modified: str | None = None
    if_range: bool = True
    stall_after: int | None = None

    def validator(self, body: bytes) -> str | None:
        """The file's ETag (derived from its bytes), else its Last-Modified date."""
        if self.etag:
            return f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        return self.last_modified

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
        if self.etag:
            extra += f"ETag: {self.validator(body)}\r\n"
        if self.last_modified:
            extra += f"Last-Modified: {self.last_modified}\r\n"
        stale = self.if_range and headers.get("if-range", self.validator(body)) != (
            self.validator(body)
        )
        if self.ranges and not stale and headers.get("range", "").startswith("bytes="):
            start = int(headers["range"][6:].split("-")[0])
            status = "206 Partial Content"
            extra += f"Content-Range: bytes {start}-{len(body) - 1}/{len(body)}\r\n"
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
        if self.stall_after is not None:
            await stream.send_all(payload[: self.stall_after])
            await trio.sleep_forever()
        for offset in range(0, len(payload), 65536):
            await stream.send_all(payload[offset : offset + 65536])

    async def _handle(self, stream: trio.SocketStream) -> None:
        # the client may hang up mid-body (it does so on purpose when a file changed)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
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


async def test_resume_sends_range_and_appends(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A cut transfer keeps its partial and its sidecar; the next download asks for the
    rest with ``If-Range`` and appends it."""
    server = FileServer({"/m.bin": BLOB}, etag=True, cut_after=300_000)
    await nursery.start(server.run)
    store = ModelStore(tmp_path)
    op = ModelDownload(model="m.bin", url=f"{server.url}/m.bin", sha256=BLOB_SHA)
    with trio.fail_after(10):
        _, signal = await _download(store, op)
        assert signal.startswith("[ERROR] download of m.bin")
        kept = (tmp_path / "m.bin.part").read_bytes()
        assert kept and BLOB.startswith(kept)
        assert json.loads((tmp_path / ".m.bin.part.json").read_text())["etag"] == (
            server.validator(BLOB)
        )
        server.cut_after = None
        events, signal = await _download(store, op)
    assert signal == "[DONE]"
    assert server.requests[-1]["range"] == f"bytes={len(kept)}-"
    assert server.requests[-1]["if-range"] == server.validator(BLOB)
    assert any(e["action"] == "download_resume" for e in events)
    assert (tmp_path / "m.bin").read_bytes() == BLOB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


BLOB2 = bytes(reversed(BLOB))
BLOB2_SHA = hashlib.sha256(BLOB2).hexdigest()


@pytest.mark.parametrize(
    "server_kind", ["etag", "last-modified", "etag, ignores If-Range", "no validator"]
)
async def test_a_file_changed_on_the_server_is_downloaded_afresh(
    tmp_path: Path, nursery: trio.Nursery, server_kind: str
) -> None:
    """The issue's case: cut, the server's file changes, resume: the stored model is the
    new file (its sha256 matches), never the old head spliced onto the new tail."""
    server = FileServer(
        {"/m.bin": BLOB},
        etag="etag" in server_kind,
        last_modified="Mon, 01 Dec 2026 10:00:00 GMT" if server_kind == "last-modified" else None,
        if_range="ignores" not in server_kind,
        cut_after=300_000,
    )
    await nursery.start(server.run)
    store = ModelStore(tmp_path)
    with trio.fail_after(10):
        await _download(store, ModelDownload(model="m.bin", url=f"{server.url}/m.bin"))
        server.files["/m.bin"] = BLOB2
        server.last_modified = server.last_modified and "Tue, 02 Dec 2026 10:00:00 GMT"
        server.cut_after = None
        op = ModelDownload(model="m.bin", url=f"{server.url}/m.bin", sha256=BLOB2_SHA)
        events, signal = await _download(store, op)
    assert signal == "[DONE]"
    assert (tmp_path / "m.bin").read_bytes() == BLOB2
    assert any(e["action"] == "download_restart" for e in events) or not server_kind.startswith(
        ("etag", "last")
    )
    assert not any(e["action"] == "download_resume" for e in events)
    if server_kind == "last-modified":
        assert server.requests[-1]["if-range"] == "Mon, 01 Dec 2026 10:00:00 GMT"


async def test_a_partial_of_another_url_or_without_a_sidecar_is_not_resumed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    server = FileServer({"/a.bin": BLOB, "/b.bin": BLOB2}, etag=True, cut_after=300_000)
    await nursery.start(server.run)
    store = ModelStore(tmp_path)
    with trio.fail_after(10):
        await _download(store, ModelDownload(model="m.bin", url=f"{server.url}/a.bin"))
        assert (tmp_path / "m.bin.part").exists()
        server.cut_after = None
        op = ModelDownload(model="m.bin", url=f"{server.url}/b.bin", sha256=BLOB2_SHA)
        events, signal = await _download(store, op)
        assert signal == "[DONE]"
        assert "range" not in server.requests[-1]
        assert any("it came from another URL" in e["human"] for e in events)
        # a partial left without its sidecar (an older hive's) is not trusted either
        (tmp_path / "n.bin.part").write_bytes(BLOB[:1000])
        op = ModelDownload(model="n.bin", url=f"{server.url}/a.bin", sha256=BLOB_SHA)
        events, signal = await _download(store, op)
    assert signal == "[DONE]"
    assert "range" not in server.requests[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "n.bin"]


async def test_a_model_named_like_a_partial_is_refused(server: FileServer, tmp_path: Path) -> None:
    """``weights.part`` would be the partial of ``weights``: such names are refused (a 422
    naming the field at the API), and the partial of ``weights`` stays as it was."""
    with pytest.raises(ValidationError, match=r"must not end in '\.part'"):
        parse_operation(
            {"operation": "model_download", "model": "weights.part", "url": "http://x/"}
        )
    (tmp_path / "weights.part").write_bytes(b"half")
    store = ModelStore(tmp_path)
    op = ModelDownload.model_construct(model="weights.PART", url=f"{server.url}/m.bin")
    with pytest.raises(DownloadError, match=r"may not end in '\.part'"):
        await store.download(op)
    assert (tmp_path / "weights.part").read_bytes() == b"half"
    assert store.list() == []


async def test_a_present_model_is_verified_not_fetched(server: FileServer, tmp_path: Path) -> None:
    """Downloading a model already there with ``sha256``: its digest is checked; a match is
    a success without a request, a mismatch downloads it again."""
    store = ModelStore(tmp_path)
    op = ModelDownload(model="m.bin", url=f"{server.url}/m.bin", sha256=BLOB_SHA)
    with trio.fail_after(10):
        _, signal = await _download(store, op)
        assert signal == "[DONE]"
        requests = len(server.requests)
        assert await store.download(op) == {
            "id": "m.bin",
            "size": len(BLOB),
            "sha256": BLOB_SHA,
            "path": str(tmp_path / "m.bin"),
        }
        assert len(server.requests) == requests
        (tmp_path / "m.bin").write_bytes(b"tampered")
        events, signal = await _download(store, op)
    assert signal == "[DONE]"
    assert any(e["action"] == "model_mismatch" for e in events)
    assert (tmp_path / "m.bin").read_bytes() == BLOB


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


async def test_cancel_keeps_a_resumable_partial(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A cancelled download whose source has a validator keeps its partial and sidecar;
    the next download resumes it."""
    server = FileServer({"/m.bin": BLOB}, etag=True, stall_after=600_000)
    await nursery.start(server.run)
    store = ModelStore(tmp_path)
    op = ModelDownload(model="m.bin", url=f"{server.url}/m.bin", sha256=BLOB_SHA)

    async def executor(job_id: str, payload: Any) -> None:
        await store.download(op)

    registry = JobRegistry(actor="hive")
    with trio.fail_after(10):
        async with execute_and_stream(registry, executor) as lines:
            while not _size(tmp_path / "m.bin.part"):
                await trio.sleep(0.01)
            assert registry.cancel_job(lines.job_id)
            rest = [line async for line in lines]
        assert rest[-1] == "[CANCELLED]"
        kept = (tmp_path / "m.bin.part").read_bytes()
        assert kept and BLOB.startswith(kept)
        server.stall_after = None
        _, signal = await _download(store, op)
    assert signal == "[DONE]"
    assert server.requests[-1]["range"] == f"bytes={len(kept)}-"
    assert (tmp_path / "m.bin").read_bytes() == BLOB


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


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


async def test_a_killed_hive_resumes_only_the_same_file(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Real hive processes: SIGKILL the hive mid-download, change the file on the server,
    start a new hive on the same models dir: the download starts over (the server's
    answer to ``If-Range`` is the new file) and the stored model has the new sha256. A
    second ``model-download --sha256`` of the present model verifies it and succeeds."""
    server = FileServer({"/m.bin": BLOB}, etag=True, stall_after=600_000)
    await nursery.start(server.run)
    models = tmp_path / "models"
    cluster = Cluster(tmp_path)
    argv = ["hive", "--port", "0", "--store", "memory", "--models-dir", str(models)]

    async def keeper(hive: str, *args: str) -> tuple[int, str]:
        with trio.fail_after(20):
            result = await trio.run_process(
                [sys.executable, "-m", "servers", "--queen", hive, "model-download", *args],
                capture_stdout=True,
                check=False,
            )
        return result.returncode, result.stdout.decode()

    url = f"{server.url}/m.bin"
    try:
        hive = cluster.start("hive", argv)
        code, out = await keeper(hive, "m.bin", "--url", url, "--detach")
        assert code == 0, out
        with trio.fail_after(10):
            while not _size(models / "m.bin.part") or not (models / ".m.bin.part.json").exists():
                await trio.sleep(0.02)
        cluster.kill("hive")
        server.files["/m.bin"], server.stall_after = BLOB2, None
        hive = cluster.start("hive-again", argv)
        code, out = await keeper(hive, "m.bin", "--url", url, "--sha256", BLOB2_SHA)
        assert code == 0, out
        assert server.requests[-1]["if-range"] == server.validator(BLOB)
        assert "Resuming" not in out
        assert (models / "m.bin").read_bytes() == BLOB2
        assert sorted(p.name for p in models.iterdir()) == ["m.bin"]
        code, out = await keeper(hive, "m.bin", "--url", url, "--sha256", BLOB2_SHA)
        assert code == 0, out
        assert "already downloaded (sha256 ok)" in out
        assert f"ready at {models / 'm.bin'}" in out
    finally:
        cluster.close()
