"""Queen configuration: hives by alias from a TOML/JSON file and ``--hive alias=URL`` flags."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._store import StoreSpec

__all__ = ["HiveEntry", "QueenConfig", "load_config_file", "parse_hive_flag"]


@dataclass
class HiveEntry:
    """One hive the queen knows: where it answers, and how to reach its host over SSH."""

    alias: str
    url: str
    ssh_host: str | None = None
    token: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "url": self.url, "ssh_host": self.ssh_host}


@dataclass
class QueenConfig:
    """How the queen runs.

    ``heartbeat_ttl_s``: a worker whose last heartbeat is older is not scheduled.
    ``schedule_wait_s``: how long an ``infer`` waits for a live worker of its model.
    ``cancel_timeout_s``: bound on the DELETE sent to a hive or worker when a forwarded
    job is cancelled or times out.
    ``stream_silence_s``: a forwarded job whose daemon sends nothing at all (no event, no
    keep-alive comment) for this long fails ``lost worker ...``/``lost hive ...`` (workers
    send a keep-alive every 5 s of quiet, hives every 15 s, so keep it above that).
    ``lost_worker_grace_s``: after a worker's heartbeat is older than ``heartbeat_ttl_s``,
    its in-flight ``infer`` jobs fail ``lost worker ...`` within this many seconds (or are
    retried on another worker when their retry policy allows).
    ``store``: where jobs are kept (memory here; the CLI defaults to a SQLite file); with
    PostgreSQL the queen shares the ``pg_schema`` tables with other queens as ``node``
    (default ``<hostname>-<pid>``), and takes over the jobs of a queen that renewed no
    lease for ``lease_s`` seconds. ``retention_s``: how long finished jobs stay in memory
    (a store keeps them longer). ``cors_origins``: origins whose web pages may use the
    API (CORS; none by default); ``allowed_hosts``: ``Host`` names the queen answers on
    loopback besides its own (a reverse proxy's).
    """

    hives: dict[str, HiveEntry] = field(default_factory=dict)
    token: str | None = None
    advertise_url: str | None = None
    heartbeat_ttl_s: float = 5.0
    schedule_wait_s: float = 10.0
    cancel_timeout_s: float = 3.0
    stream_silence_s: float = 60.0
    lost_worker_grace_s: float = 0.5
    ssh_timeout_s: float = 15.0
    max_concurrent: int | None = None
    store: StoreSpec = field(default_factory=lambda: StoreSpec("memory"))
    pg_schema: str = "trio_jobs"
    node: str | None = None
    lease_s: float = 10.0
    retention_s: float = 600.0
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("stream_silence_s", "lost_worker_grace_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def parse_hive_flag(value: str) -> HiveEntry:
    """``alias=http://host:port`` (a bare URL gets the alias ``localhost``)."""
    alias, sep, url = value.partition("=")
    if not sep:
        alias, url = "localhost", value
    alias, url = alias.strip(), url.strip()
    if not alias or not url.startswith(("http://", "https://")):
        raise ValueError(f"--hive wants alias=http://host:port, got {value!r}")
    return HiveEntry(alias, url.rstrip("/"))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON file into a dict.

    Recognised keys: ``token``, ``advertise_url``, ``heartbeat_ttl_s``, ``schedule_wait_s``,
    ``stream_silence_s``, ``lost_worker_grace_s``, ``host``, ``port``, ``cors_origins`` and
    ``allowed_hosts`` (lists of strings) and a ``hives`` table of ``alias = "URL"`` or
    ``alias = {url = ..., ssh_host = ..., token = ...}``; the hive daemon reads its own
    keys (``models_dir``, ``model_source``, ...) from the same kind of file.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a table/object")
    return data


def hives_from_config(data: dict[str, Any]) -> dict[str, HiveEntry]:
    """The ``hives`` table of a config file as entries."""
    hives: dict[str, HiveEntry] = {}
    raw = data.get("hives") or {}
    if not isinstance(raw, dict):
        raise ValueError("'hives' must map alias to a URL or a table")
    for alias, spec in raw.items():
        if isinstance(spec, str):
            hives[alias] = parse_hive_flag(f"{alias}={spec}")
        elif isinstance(spec, dict) and isinstance(spec.get("url"), str):
            entry = parse_hive_flag(f"{alias}={spec['url']}")
            entry.ssh_host = spec.get("ssh_host")
            entry.token = spec.get("token")
            hives[alias] = entry
        else:
            raise ValueError(f"hive {alias!r}: expected a URL or a table with 'url'")
    return hives
