"""Schema migrations, kept as data: per dialect, ``(version, statements)`` in order.

Each version's statements run in one transaction (PostgreSQL's under an advisory lock, as
queens may start together). A job's history is a JSON column of its row; its events are
stored in chunks, one row per run of events written by one flush: a JSON object of
columns (``{"id": first, "ts": [...], "actor": ..., "action": ..., "human": [...],
"fields": [...]}``, see ``_rows``; earlier versions wrote rows of items, ``[[id, ts,
actor, action, human, fields], ...]``, which are still read). From version 2 the ``error`` column
holds JSON text (PostgreSQL's ``text`` cannot hold NUL) and ``reserved_id`` records the
event ids a process may have handed out. Version 3 indexes jobs by creation (listings) and
adds ``members``: the workers and hives the nodes sharing a store know.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MIGRATIONS", "POSTGRES", "SQLITE"]

Migrations = Sequence[tuple[int, Sequence[str]]]

SQLITE: Migrations = [
    (
        1,
        [
            """CREATE TABLE jobs (
                id TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                error TEXT,
                payload TEXT,
                timeout REAL,
                priority INTEGER NOT NULL,
                retry TEXT,
                tags TEXT,
                metadata TEXT,
                attempts INTEGER NOT NULL,
                created_at REAL NOT NULL,
                started_at REAL,
                finished_at REAL,
                next_attempt_at REAL,
                expires_at REAL,
                history TEXT NOT NULL
            )""",
            "CREATE INDEX jobs_unfinished ON jobs (finished_at, created_at)",
            """CREATE TABLE events (
                job_id TEXT NOT NULL,
                first_id INTEGER NOT NULL,
                last_id INTEGER NOT NULL,
                events TEXT NOT NULL,
                PRIMARY KEY (job_id, first_id)
            ) WITHOUT ROWID""",
        ],
    ),
    (
        2,
        [
            "ALTER TABLE jobs ADD COLUMN reserved_id INTEGER NOT NULL DEFAULT 0",
            "UPDATE jobs SET error = json_quote(error) WHERE error IS NOT NULL",
        ],
    ),
    (
        3,
        [
            "CREATE INDEX jobs_created ON jobs (created_at, id)",
            """CREATE TABLE members (
                kind TEXT NOT NULL,
                key TEXT NOT NULL,
                data TEXT NOT NULL,
                seen_at REAL NOT NULL,
                node TEXT,
                PRIMARY KEY (kind, key)
            ) WITHOUT ROWID""",
        ],
    ),
]

POSTGRES: Migrations = [
    (
        1,
        [
            """CREATE TABLE jobs (
                id TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                error TEXT,
                payload TEXT,
                timeout DOUBLE PRECISION,
                priority INTEGER NOT NULL,
                retry TEXT,
                tags TEXT,
                metadata TEXT,
                attempts INTEGER NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                started_at DOUBLE PRECISION,
                finished_at DOUBLE PRECISION,
                next_attempt_at DOUBLE PRECISION,
                expires_at DOUBLE PRECISION,
                history TEXT NOT NULL,
                owner TEXT,
                lease_until DOUBLE PRECISION,
                cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
            )""",
            "CREATE INDEX jobs_unfinished ON jobs (finished_at, created_at)",
            "CREATE INDEX jobs_claimable ON jobs (priority DESC, created_at) "
            "WHERE state = 'queued'",
            "CREATE INDEX jobs_owned ON jobs (owner) WHERE owner IS NOT NULL "
            "AND state IN ('queued', 'running', 'retrying')",
            """CREATE TABLE events (
                job_id TEXT NOT NULL,
                first_id INTEGER NOT NULL,
                last_id INTEGER NOT NULL,
                events TEXT NOT NULL,
                PRIMARY KEY (job_id, first_id)
            )""",
        ],
    ),
    (
        2,
        [
            "ALTER TABLE jobs ADD COLUMN reserved_id BIGINT NOT NULL DEFAULT 0",
            "UPDATE jobs SET error = to_json(error)::text WHERE error IS NOT NULL",
        ],
    ),
    (
        3,
        [
            'CREATE INDEX jobs_created ON jobs (created_at, id COLLATE "C")',
            """CREATE TABLE members (
                kind TEXT NOT NULL,
                key TEXT NOT NULL,
                data TEXT NOT NULL,
                seen_at DOUBLE PRECISION NOT NULL,
                node TEXT,
                PRIMARY KEY (kind, key)
            )""",
        ],
    ),
]

MIGRATIONS: dict[str, Migrations] = {"sqlite": SQLITE, "postgres": POSTGRES}
