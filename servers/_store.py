"""Where a daemon keeps its jobs: ``--store memory | sqlite:PATH | postgres:DSN``.

One parser (:func:`parse_store`) and one resolver (:func:`resolve_store`) serve the queen
and the hive. Without ``--store`` a daemon keeps its jobs in a SQLite file in its state
directory (``--state-dir``; default ``$XDG_STATE_HOME/trio-jobs`` or
``~/.local/state/trio-jobs``), named after the daemon (``queen.db``, ``hive.db``,
``hive-<id>.db`` for a hive with another id), so a daemon restarted after a crash still
knows every job. A SQLite file is locked for one daemon at a time (a second daemon on the
same file would recover, and fail, the first one's running jobs). With ``postgres:DSN``
several queens share one table (see :func:`trio_jobs.run_shared_jobs`).
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import trio

from trio_jobs import JobStore, PostgresStore, SQLiteStore

__all__ = [
    "StoreSpec",
    "StoreInUse",
    "StoreUnavailable",
    "start_store",
    "default_state_dir",
    "lock_store",
    "make_store",
    "parse_store",
    "resolve_store",
    "STORE_HELP",
]

STORE_HELP = (
    "where jobs are kept: memory, sqlite:PATH or postgres:DSN "
    "(default: sqlite:<state dir>/<daemon>.db)"
)


@dataclass(frozen=True)
class StoreSpec:
    """A parsed ``--store`` value: ``kind`` and, for SQL stores, the file or DSN."""

    kind: Literal["memory", "sqlite", "postgres"]
    target: str = ""

    def __str__(self) -> str:
        if self.kind == "memory":
            return "memory"
        if self.kind == "postgres":
            return "postgres:<dsn>"  # never log a DSN: it may hold a password
        return f"sqlite:{self.target}"


def parse_store(value: str) -> StoreSpec:
    """Parse ``memory``, ``sqlite:PATH`` or ``postgres:DSN`` (also a bare
    ``postgres://`` / ``postgresql://`` URL). Raises ValueError saying what is expected."""
    text = value.strip()
    if text == "memory":
        return StoreSpec("memory")
    if text.startswith(("postgres://", "postgresql://")):
        return StoreSpec("postgres", text)
    kind, sep, target = text.partition(":")
    target = target.strip()
    if sep and kind in ("postgres", "postgresql"):
        if not target:
            raise ValueError("postgres: needs a DSN, e.g. postgres:postgresql://user@host/db")
        return StoreSpec("postgres", target)
    if sep and kind == "sqlite":
        if not target:
            raise ValueError("sqlite: needs a file path, e.g. sqlite:/var/lib/trio-jobs/queen.db")
        return StoreSpec("sqlite", os.path.abspath(os.path.expanduser(target)))
    raise ValueError(f"--store wants memory, sqlite:PATH or postgres:DSN, got {value!r}")


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/trio-jobs``, else ``~/.local/state/trio-jobs``."""
    base = os.environ.get("XDG_STATE_HOME")
    if base and os.path.isabs(base):
        return Path(base) / "trio-jobs"
    return Path.home() / ".local" / "state" / "trio-jobs"


def _file_name(daemon: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", daemon) + ".db"


def resolve_store(
    flag: str | None,
    state_dir: str | None,
    config: dict[str, Any],
    *,
    daemon: str,
) -> StoreSpec:
    """The store a daemon uses: ``--store``, else the config file's ``store``, else
    ``sqlite:<state dir>/<daemon>.db``; the state directory is ``--state-dir``, else the
    config's ``state_dir``, else :func:`default_state_dir` (created when needed)."""
    value = flag if flag is not None else config.get("store")
    if value is not None:
        if not isinstance(value, str):
            raise ValueError(f"'store' must be a string, got {value!r}")
        return parse_store(value)
    directory = state_dir if state_dir is not None else config.get("state_dir")
    if directory is not None and not isinstance(directory, str):
        raise ValueError(f"'state_dir' must be a string, got {directory!r}")
    root = Path(directory).expanduser() if directory else default_state_dir()
    return StoreSpec("sqlite", str((root / _file_name(daemon)).absolute()))


class StoreInUse(Exception):
    """Another process holds the SQLite file's lock."""


def lock_store(spec: StoreSpec) -> IO[bytes] | None:
    """For a SQLite store: create its directory and take ``<file>.lock`` for this process
    (kept until it exits; the kernel drops it even on SIGKILL). Returns the open lock
    file, which the caller keeps open. Raises :class:`StoreInUse`."""
    if spec.kind != "sqlite":
        return None
    path = Path(spec.target)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = open(f"{path}.lock", "ab")  # noqa: SIM115 - held for the process's lifetime
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StoreInUse(
            f"{path} is in use by another daemon; give each daemon its own --state-dir or --store"
        ) from None
    return lock


def make_store(
    spec: StoreSpec, *, schema: str = "trio_jobs", node: str | None = None
) -> JobStore | None:
    """The store for ``spec`` (None for ``memory``: a plain in-memory registry).
    ``schema`` and ``node`` apply to PostgreSQL (``node``: shared mode)."""
    if spec.kind == "memory":
        return None
    if spec.kind == "sqlite":
        return SQLiteStore(spec.target)
    return PostgresStore(spec.target, schema=schema, node=node)


class StoreUnavailable(Exception):
    """The daemon's store could not be opened (or recovered from) at start-up."""


async def start_store(
    nursery: trio.Nursery,
    spec: StoreSpec,
    task: Callable[..., Awaitable[Any]],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``nursery.start(task, *args, **kwargs)`` for the task that opens and recovers the
    store (``run_persistence`` or ``run_shared_jobs``); a failure before it started is
    raised as :class:`StoreUnavailable` naming the store (never the DSN)."""
    try:
        return await nursery.start(
            lambda task_status: task(*args, task_status=task_status, **kwargs)
        )
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        reason = str(leaf).strip() or type(leaf).__name__
        raise StoreUnavailable(f"cannot open the job store {spec}: {reason}") from exc
