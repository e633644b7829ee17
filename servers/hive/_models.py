"""The hive's models directory: downloads with progress, safe resume, sha256 and atomic rename.

A download is written to ``<id>.part`` (no model may be named ``*.part``) and renamed to
``<id>`` only once the whole body arrived and its sha256 (when given) matched, so a file
under its id is always complete. Beside the partial, ``.<id>.part.json`` (a dot-file: no
model id starts with a dot) ties it to its source: the URL and the validator of the
response it came from (a strong ``ETag``, else ``Last-Modified``).

Resume sends ``Range`` with ``If-Range`` carrying that validator, so a server whose file
changed answers the whole new file (200) and the download starts over; a ``206`` whose
validator or total size differs from the stored one (a server that ignores ``If-Range``)
is refused the same way. A partial is never spliced onto another file: a different URL,
a missing or unreadable sidecar, or a source without a validator means starting over.

Kept for a later resume: the partial of a download that was cancelled, whose connection
broke, or whose hive was killed, when its source has a validator. Removed: the partial of
a download that failed for good (an HTTP error status, a sha256 mismatch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import asdict, dataclass
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
    """A download failed: bad status, broken transfer or a checksum mismatch.

    ``resumable``: the transfer was cut, not refused; its partial is kept for a resume.
    """

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


class UnknownModel(LookupError):
    """No model file with that id in the models directory."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"unknown model {model_id!r}")


class _Restart(Exception):
    """The partial cannot be continued (the server's file changed): start over."""


@dataclass(frozen=True)
class _Source:
    """Where a partial download came from: what the sidecar file holds."""

    url: str
    etag: str | None = None
    last_modified: str | None = None
    size: int | None = None

    @classmethod
    def of(cls, url: str, response: httpx.Response, size: int | None) -> _Source:
        etag = response.headers.get("etag")
        if etag is not None and etag.startswith("W/"):
            etag = None  # If-Range needs a strong validator (RFC 9110 13.1.5)
        return cls(url, etag, response.headers.get("last-modified"), size)

    @property
    def validator(self) -> str | None:
        """What ``If-Range`` carries: the strong ETag, else the Last-Modified date."""
        return self.etag or self.last_modified

    def same_file(self, response: httpx.Response, size: int | None) -> bool:
        """Whether a ``206`` answer is a range of the file this partial came from."""
        fresh = _Source.of(self.url, response, size)
        return (
            (self.etag is None or fresh.etag is None or fresh.etag == self.etag)
            and (
                self.etag is not None
                or fresh.last_modified is None
                or fresh.last_modified == self.last_modified
            )
            and (self.size is None or size is None or size == self.size)
        )


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


def _read_source(path: Path) -> _Source | None:
    """The sidecar's source, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        source = _Source(**data)
    except (OSError, ValueError, TypeError):
        return None
    return source if isinstance(source.url, str) else None


def _write_source(path: Path, source: _Source) -> None:
    """Write the sidecar atomically (a torn sidecar would read as "no source")."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(asdict(source)), encoding="utf-8")
    os.replace(temporary, path)


class ModelStore:
    """Model files in one directory; ids are plain file names (see the module docstring
    for partial downloads and how they are resumed)."""

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

    def partial_path(self, model_id: str) -> Path:
        """Where the download of ``model_id`` is written until it is complete."""
        return self.directory / (model_id + PART_SUFFIX)

    def source_path(self, model_id: str) -> Path:
        """The sidecar that ties the partial of ``model_id`` to its URL and validator."""
        return self.directory / f".{model_id}{PART_SUFFIX}.json"

    def list(self) -> list[dict[str, Any]]:
        """Every complete model file with its size and modification time."""
        if not self.directory.is_dir():
            return []
        out = []
        for entry in sorted(self.directory.iterdir()):
            name = entry.name
            if entry.is_file() and not name.endswith(PART_SUFFIX) and not name.startswith("."):
                stat = entry.stat()
                out.append({"id": name, "size": stat.st_size, "modified": stat.st_mtime})
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

        A model already present is verified instead (with ``op.sha256``) and downloaded
        again only when its digest differs. On cancellation the partial file is kept when
        the download can be resumed later (see the module docstring).

        Returns:
            ``{"id", "size", "sha256", "path"}`` of the stored file (``sha256`` left out
            for a present file that nobody asked to verify).

        Raises:
            DownloadError: bad HTTP status, transfer error or sha256 mismatch; the final
                name is never written, and the partial is kept only when ``resumable``.
        """
        url = self._url(op)
        if op.model.lower().endswith(PART_SUFFIX):
            raise DownloadError(f"{op.model!r}: a model name may not end in {PART_SUFFIX!r}")
        if op.model in self._downloading:
            raise DownloadError(f"{op.model} is already being downloaded by another job")
        self._downloading.add(op.model)
        try:
            return await self._download(op, url)
        finally:
            self._downloading.discard(op.model)

    async def _download(self, op: ModelDownload, url: str) -> dict[str, Any]:
        final = self.path(op.model)
        part, sidecar = self.partial_path(op.model), self.source_path(op.model)
        expected = op.sha256.lower() if op.sha256 else None
        self.directory.mkdir(parents=True, exist_ok=True)
        if final.is_file():
            present = {"id": op.model, "size": final.stat().st_size, "path": str(final)}
            if expected is None:
                narrate("model_present", f"Model {op.model} is already downloaded")
                return present
            digest, _ = await trio.to_thread.run_sync(_sha256_file, final)
            if digest == expected:
                narrate("model_present", f"Model {op.model} is already downloaded (sha256 ok)")
                return {**present, "sha256": digest}
            narrate(
                "model_mismatch",
                f"Model {op.model} is present but its sha256 is {digest}; downloading it again",
                sha256=digest,
            )
        completed = keep = False
        try:
            try:
                result = await self._fetch(op.model, url, part, sidecar, expected)
            except _Restart:
                self._discard(part, sidecar)
                result = await self._fetch(op.model, url, part, sidecar, expected)
            await trio.to_thread.run_sync(os.replace, part, final)
            sidecar.unlink(missing_ok=True)
            completed = True
            return {**result, "path": str(final)}
        except DownloadError as exc:
            keep = exc.resumable
            raise
        except httpx.HTTPError as exc:
            keep = True
            raise DownloadError(
                f"download of {op.model} from {url} failed: {exc}", resumable=True
            ) from None
        except BaseException:  # cancelled, or the hive is stopping: resume it later
            keep = True
            raise
        finally:
            if not completed:
                if keep and part.exists() and _read_source(sidecar) is not None:
                    logger.info("kept %s for a later resume", part)
                else:
                    self._discard(part, sidecar)

    @staticmethod
    def _discard(part: Path, sidecar: Path) -> None:
        part.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)

    async def _fetch(
        self, model: str, url: str, part: Path, sidecar: Path, expected: str | None
    ) -> dict[str, Any]:
        offset = await trio.to_thread.run_sync(_size_or_zero, part)
        source = await trio.to_thread.run_sync(_read_source, sidecar) if offset else None
        if offset and (source is None or source.url != url or source.validator is None):
            why = (
                "it came from another URL"
                if source is not None and source.url != url
                else "nothing ties it to the file on the server"
            )
            narrate("download_restart", f"Discarding the partial download of {model}: {why}")
            self._discard(part, sidecar)
            offset, source = 0, None
        headers = {}
        if offset and source is not None and source.validator is not None:
            headers = {"Range": f"bytes={offset}-", "If-Range": source.validator}
        timeout = httpx.Timeout(10.0, read=60.0)
        narrate("download_start", f"Downloading {model} from {url}", url=url, resume_from=offset)
        async with (
            httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            status = response.status_code
            total: int | None = None
            digest: Any = hashlib.sha256()
            if status == 206 and offset and source is not None:
                match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                if match is None or int(match.group(1)) != offset:
                    raise DownloadError(f"server sent a range that does not start at {offset}")
                if match.group(3) != "*":
                    total = int(match.group(3))
                if not source.same_file(response, total):
                    narrate(
                        "download_restart",
                        f"The file of {model} changed on the server; downloading it again",
                    )
                    raise _Restart
                _, digest = await trio.to_thread.run_sync(_sha256_file, part)
                narrate("download_resume", f"Resuming {model} at {human_bytes(offset)}")
                mode = "ab"
            elif status == 416 and offset:
                narrate(
                    "download_restart",
                    f"The file of {model} on the server is shorter than the partial download; "
                    "downloading it again",
                )
                raise _Restart
            elif status == 200:
                if offset:
                    narrate(
                        "download_restart",
                        f"The server sent the whole file (it changed, or it ignores ranges); "
                        f"downloading {model} again",
                    )
                offset = 0
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                fresh = _Source.of(url, response, total)
                if fresh.validator is not None:
                    await trio.to_thread.run_sync(_write_source, sidecar, fresh)
                else:
                    await trio.to_thread.run_sync(
                        lambda: sidecar.unlink(missing_ok=True)  # not resumable
                    )
                mode = "wb"
            else:  # a server-side hiccup leaves a partial worth resuming
                transient = status >= 500 or status in (408, 429)
                raise DownloadError(f"GET {url} answered HTTP {status}", resumable=transient)
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
            raise DownloadError(
                f"download of {model} ended at {done} of {total} bytes", resumable=True
            )
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
