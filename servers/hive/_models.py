"""The hive's models directory: downloads with progress, resume, sha256 and atomic rename."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any, cast

import httpx
import trio

from trio_jobs import narrate

from .._units import human_bytes
from ..operations import ModelDownload

__all__ = ["DownloadError", "ModelStore", "UnknownModel", "PART_SUFFIX"]

logger = logging.getLogger("servers.hive")

PART_SUFFIX = ".part"
_CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(Exception):
    """A download failed: bad status, broken transfer or a checksum mismatch."""


class UnknownModel(LookupError):
    """No model file with that id in the models directory."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"unknown model {model_id!r}")


def _sha256_file(path: Path) -> tuple[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest(), digest


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class ModelStore:
    """Model files in one directory; ids are plain file names.

    A download writes ``<id>.part`` and renames it to ``<id>`` only after the whole body
    arrived and its sha256 (when given) matched, so a file under its id is always complete.
    On failure or cancel the ``.part`` file is removed; a ``.part`` left by a killed hive
    is resumed with a ``Range`` request when the server allows it.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        source: str | None = None,
        progress_interval_s: float = 0.25,
    ) -> None:
        self.directory = Path(directory)
        self.source = source
        self.progress_interval_s = progress_interval_s
        self._downloading: set[str] = set()

    def path(self, model_id: str) -> Path:
        return self.directory / model_id

    def list(self) -> list[dict[str, Any]]:
        """Every complete model file with its size and modification time."""
        if not self.directory.is_dir():
            return []
        out = []
        for entry in sorted(self.directory.iterdir()):
            if entry.is_file() and not entry.name.endswith(PART_SUFFIX):
                stat = entry.stat()
                out.append({"id": entry.name, "size": stat.st_size, "modified": stat.st_mtime})
        return out

    async def get(self, model_id: str) -> dict[str, Any]:
        """One model file with its size and sha256 (hashed in a worker thread)."""
        path = self.path(model_id)
        if not path.is_file():
            raise UnknownModel(model_id)
        digest, _ = await trio.to_thread.run_sync(_sha256_file, path)
        return {"id": model_id, "size": path.stat().st_size, "sha256": digest, "path": str(path)}

    def delete(self, model_id: str) -> dict[str, Any]:
        path = self.path(model_id)
        if not path.is_file():
            raise UnknownModel(model_id)
        size = path.stat().st_size
        path.unlink()
        return {"id": model_id, "size": size}

    def _url(self, op: ModelDownload) -> str:
        if op.url:
            return op.url
        if self.source:
            return f"{self.source.rstrip('/')}/{op.model}"
        raise DownloadError(
            f"model_download of {op.model!r} needs a url (this hive has no --model-source)"
        )

    async def download(self, op: ModelDownload) -> dict[str, Any]:
        """Fetch ``op.url`` into ``<models dir>/<op.model>``, narrating progress.

        Raises:
            DownloadError: bad HTTP status, transfer error or sha256 mismatch; no file is
                left behind (neither the ``.part`` nor the final name).
        """
        url = self._url(op)
        if op.model in self._downloading:
            raise DownloadError(f"{op.model} is already being downloaded by another job")
        self._downloading.add(op.model)
        try:
            return await self._download(op, url)
        finally:
            self._downloading.discard(op.model)

    async def _download(self, op: ModelDownload, url: str) -> dict[str, Any]:
        final = self.path(op.model)
        part = self.path(op.model + PART_SUFFIX)
        expected = op.sha256.lower() if op.sha256 else None
        self.directory.mkdir(parents=True, exist_ok=True)
        if final.is_file():
            if expected is None:
                narrate("model_present", f"Model {op.model} is already downloaded")
                return {"id": op.model, "size": final.stat().st_size, "path": str(final)}
            digest, _ = await trio.to_thread.run_sync(_sha256_file, final)
            if digest == expected:
                narrate("model_present", f"Model {op.model} is already downloaded (sha256 ok)")
                return {"id": op.model, "size": final.stat().st_size, "sha256": digest}
        completed = False
        try:
            result = await self._fetch(op.model, url, part, expected)
            await trio.to_thread.run_sync(os.replace, part, final)
            completed = True
            return {**result, "path": str(final)}
        except httpx.HTTPError as exc:
            raise DownloadError(f"download of {op.model} from {url} failed: {exc}") from None
        finally:
            if not completed:
                part.unlink(missing_ok=True)

    async def _fetch(
        self, model: str, url: str, part: Path, expected: str | None
    ) -> dict[str, Any]:
        offset = await trio.to_thread.run_sync(_size_or_zero, part)
        digest: Any = hashlib.sha256()
        if offset:
            _, digest = await trio.to_thread.run_sync(_sha256_file, part)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        timeout = httpx.Timeout(10.0, read=60.0)
        narrate("download_start", f"Downloading {model} from {url}", url=url, resume_from=offset)
        async with (
            httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            status = response.status_code
            total: int | None = None
            if status == 206 and offset:
                match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                if match is None or int(match.group(1)) != offset:
                    raise DownloadError(f"server sent a range that does not start at {offset}")
                if match.group(3) != "*":
                    total = int(match.group(3))
                narrate("download_resume", f"Resuming {model} at {human_bytes(offset)}")
                mode = "ab"
            elif status == 200:
                if offset:
                    narrate("download_restart", f"Server ignored the range; restarting {model}")
                offset = 0
                digest = hashlib.sha256()
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                mode = "wb"
            else:
                raise DownloadError(f"GET {url} answered HTTP {status}")
            done = offset
            started = time.monotonic()
            last = started
            async with (
                await trio.open_file(part, mode) as file,
                aclosing(cast(AsyncGenerator[bytes, None], response.aiter_bytes(_CHUNK))) as chunks,
            ):
                async for chunk in chunks:
                    await file.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last >= self.progress_interval_s:
                        last = now
                        self._progress(model, done, total, offset, now - started)
            self._progress(model, done, total, offset, time.monotonic() - started)
        if total is not None and done != total:
            raise DownloadError(f"download of {model} ended at {done} of {total} bytes")
        actual = str(digest.hexdigest())
        if expected is not None and actual != expected:
            raise DownloadError(f"sha256 mismatch for {model}: expected {expected}, got {actual}")
        narrate(
            "download_complete",
            f"Downloaded {model}: {human_bytes(done)}" + (" (sha256 verified)" if expected else ""),
            size=done,
            sha256=actual,
        )
        return {"id": model, "size": done, "sha256": actual}

    def _progress(
        self, model: str, done: int, total: int | None, start: int, elapsed: float
    ) -> None:
        rate = (done - start) / elapsed if elapsed > 0 else 0.0
        if total:
            percent = 100.0 * done / total
            human = (
                f"{model}: {human_bytes(done)} / {human_bytes(total)} ({percent:.1f}%) "
                f"at {human_bytes(rate)}/s"
            )
        else:
            percent = None
            human = f"{model}: {human_bytes(done)} at {human_bytes(rate)}/s"
        narrate(
            "download_progress",
            human,
            progress={"done": done, "total": total, "unit": "bytes"},
            percent=None if percent is None else round(percent, 1),
            rate_bytes_s=round(rate),
        )
