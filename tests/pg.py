"""A throw-away PostgreSQL server for the tests.

``dsn_or_skip()`` answers, once per test process:

- ``TRIO_JOBS_PG_DSN`` when it is set (a server you run yourself), else
- a cluster it creates under a temp dir with the server binaries (``initdb``, ``pg_ctl``
  on PATH or under ``/usr/lib/postgresql/*/bin``), listening on a unix socket in that dir
  only, stopped and deleted when the process exits. As root the server runs as the
  ``postgres`` user (or ``nobody``), since PostgreSQL refuses to run as root.

Without either, the calling test is skipped with a message saying how to run it (or
fails, when ``TRIO_JOBS_REQUIRE_PG`` is set).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

HOW = (
    "PostgreSQL tests need a server: install Debian's `postgresql` package "
    "(apt-get install -y postgresql) so the tests start a throw-away cluster, "
    "or set TRIO_JOBS_PG_DSN to a server's connection string"
)


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, if any."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """One initdb'd data directory and its running server."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="trio-jobs-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    entry = pwd.getpwnam(name)
                    os.chown(self.root, entry.pw_uid, entry.pw_gid)
                    self.user = name
                    break
            else:
                raise RuntimeError("running as root and no postgres/nobody user to run as")
        os.chmod(self.root, 0o700)

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user is not None:
            return ["runuser", "-u", self.user, "--", *cmd]
        return cmd

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            self._cmd(*args), capture_output=True, text=True, timeout=120, cwd=self.root
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): {result.stdout}{result.stderr}"
            )

    def start(self) -> str:
        """Create the cluster and start its server; the DSN."""
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        return self.up()

    def up(self) -> str:
        """Start the server (again, after :meth:`down`); the DSN."""
        options = (
            f"-k {self.root} -p {self.port} -c listen_addresses='' -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )
        return f"host={self.root} port={self.port} user=postgres dbname=postgres"

    def down(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (an outage): connections are closed."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.down("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@functools.cache
def _dsn() -> tuple[str | None, str]:
    env = os.environ.get("TRIO_JOBS_PG_DSN")
    if env:
        return env, ""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return None, HOW
    cluster = Cluster(bin_dir)
    try:
        dsn = cluster.start()
    except Exception as exc:
        cluster.stop()
        return None, f"could not start a throw-away PostgreSQL cluster ({exc}); {HOW}"
    atexit.register(cluster.stop)
    return dsn, ""


def dsn_or_skip() -> str:
    """A PostgreSQL connection string, or skip the calling test saying how to get one
    (fail it instead when ``TRIO_JOBS_REQUIRE_PG`` is set, as in CI)."""
    dsn, why = _dsn()
    if dsn is None:
        if os.environ.get("TRIO_JOBS_REQUIRE_PG"):
            pytest.fail(f"TRIO_JOBS_REQUIRE_PG is set but there is no server: {why}")
        pytest.skip(why)
    return dsn


_schemas = iter(range(1, 1_000_000))


def fresh_schema() -> str:
    """A schema name not used before in this process (one per test keeps them apart)."""
    return f"t{os.getpid()}_{next(_schemas)}"


def persist_every_registry(kind: str | None, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """Give every ``JobRegistry()`` made during a test a store of ``kind`` (``memory``,
    ``sqlite``, ``postgres``; None or empty: leave registries alone).

    For running a whole suite on each store (``TRIO_JOBS_TEST_STORE``), from an autouse
    fixture. SQL stores are made with ``threaded=False``: under an autojumping
    ``MockClock`` a database call in a worker thread would let virtual time jump.
    """
    if not kind:
        return
    from trio_jobs import JobRegistry
    from trio_jobs._stores import JobStore, MemoryStore, PostgresStore, SQLiteStore

    if kind == "postgres":
        dsn = dsn_or_skip()
    elif kind not in ("memory", "sqlite"):
        raise ValueError(f"TRIO_JOBS_TEST_STORE must be memory, sqlite or postgres: {kind!r}")
    original = JobRegistry.__init__
    counter = iter(range(1_000_000))

    def make() -> JobStore:
        if kind == "memory":
            return MemoryStore()
        if kind == "sqlite":
            return SQLiteStore(tmp / f"registry{next(counter)}.db", threaded=False)
        return PostgresStore(dsn, schema=fresh_schema(), threaded=False)

    def init(self: JobRegistry, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("store") is None:
            kwargs["store"] = make()
        original(self, *args, **kwargs)

    monkeypatch.setattr(JobRegistry, "__init__", init)
