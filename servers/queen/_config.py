"""Daemon configuration files (strictly checked) and the queen's settings: hives by alias
from a TOML/JSON file and ``--hive alias=URL`` flags.

One file can serve every daemon: top-level keys apply to each daemon that knows them, and a
``[queen]``, ``[hive]`` or ``[worker]`` table overrides them for that daemon. Every daemon
checks the whole file: a key or section no daemon knows, or a value of the wrong type, is an
error naming it (with a "did you mean" when a known name is close), never silently ignored.
Relative paths in the file (``state_dir``, ``models_dir``, ``store = "sqlite:..."``) are
relative to the file's directory.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._store import StoreSpec

__all__ = [
    "CONFIG_KEYS",
    "ConfigError",
    "HiveEntry",
    "QueenConfig",
    "load_config_file",
    "parse_hive_flag",
    "read_config",
    "validate_config",
]


class ConfigError(ValueError):
    """A config file has an unknown key or section, or a value of the wrong type."""


_COMMON = {"token": "string", "host": "string", "port": "integer"}
_SERVING = {
    "store": "string",
    "state_dir": "path",
    "pg_schema": "string",
    "retention_s": "number",
    "max_concurrent": "integer",
    "cors_origins": "strings",
    "allowed_hosts": "strings",
}
CONFIG_KEYS: dict[str, dict[str, str]] = {
    "queen": {
        **_COMMON,
        **_SERVING,
        "advertise_url": "string",
        "heartbeat_ttl_s": "number",
        "schedule_wait_s": "number",
        "stream_silence_s": "number",
        "lost_worker_grace_s": "number",
        "background_timeout_s": "number",
        "node": "string",
        "lease_s": "number",
        "hives": "table",
    },
    "hive": {
        **_COMMON,
        **_SERVING,
        "hive_id": "string",
        "models_dir": "path",
        "model_source": "string",
        "queen_url": "string",
        "worker_host": "string",
        "worker_grace_s": "number",
        "heartbeat_s": "number",
    },
    "worker": {
        **_COMMON,
        "worker_id": "string",
        "model": "string",
        "hive_id": "string",
        "queen_url": "string",
        "backend": "string",
        "upstream_url": "string",
        "upstream_model": "string",
        "token_delay_s": "number",
        "heartbeat_s": "number",
        "stop_grace_s": "number",
        "max_concurrent": "integer",
    },
}
"""Each daemon's config keys and the kind of value each takes (``string``, ``path``,
``integer``, ``number``, ``strings``: a list of strings, ``table``)."""

HIVE_TABLE_KEYS = ("url", "ssh_host", "token")
"""Keys of a ``[hives.ALIAS]`` table."""


def _suggest(name: str, known: list[str], fmt: str = "'{}'") -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


def _kind_error(kind: str, value: Any) -> str | None:
    """Why ``value`` is not of ``kind``, or None when it is."""
    ok = {
        "string": lambda v: isinstance(v, str),
        "path": lambda v: isinstance(v, str) and v != "",
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "table": lambda v: isinstance(v, dict),
    }[kind](value)
    if ok:
        return None
    wants = {"strings": "a list of strings", "integer": "an integer", "table": "a table"}
    return f"must be {wants.get(kind, 'a ' + kind)}, got {value!r}"


def validate_config(data: dict[str, Any]) -> None:
    """Check a whole config file (every daemon's keys and sections).

    Raises:
        ConfigError: naming every unknown key or section and every value of the wrong
            type, each with a "did you mean" when a known name is close.
    """
    every = {key: kind for keys in CONFIG_KEYS.values() for key, kind in keys.items()}
    problems: list[str] = []

    def check(where: str, table: dict[str, Any], known: dict[str, str]) -> None:
        for key, value in table.items():
            if key not in known:
                if isinstance(value, dict) and where == "":
                    names = [*CONFIG_KEYS, "hives"]
                    problems.append(f"unknown section [{key}]{_suggest(key, names, '[{}]')}")
                else:
                    in_where = f" in [{where}]" if where else ""
                    hint = _suggest(key, sorted(known))
                    problems.append(f"unknown key {key!r}{in_where}{hint}")
                continue
            error = _kind_error(known[key], value)
            if error is not None:
                problems.append(f"{f'[{where}] ' if where else ''}{key} {error}")
            elif key == "hives":
                check_hives(value)

    def check_hives(hives: dict[str, Any]) -> None:
        for alias, spec in hives.items():
            if isinstance(spec, str):
                continue
            if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
                problems.append(f"hive {alias!r}: expected a URL or a table with 'url'")
                continue
            for key, value in spec.items():
                if key not in HIVE_TABLE_KEYS:
                    hint = _suggest(key, list(HIVE_TABLE_KEYS))
                    problems.append(f"unknown key {key!r} in [hives.{alias}]{hint}")
                elif not isinstance(value, str):
                    problems.append(f"[hives.{alias}] {key} must be a string, got {value!r}")

    sections = {name: data[name] for name in CONFIG_KEYS if name in data}
    check("", {k: v for k, v in data.items() if k not in sections}, every)
    for name, section in sections.items():
        if not isinstance(section, dict):
            problems.append(f"[{name}] must be a table, got {section!r}")
        else:
            check(name, section, CONFIG_KEYS[name])
    if problems:
        raise ConfigError("; ".join(problems))


def _resolve_path(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).absolute())


def read_config(path: str | os.PathLike[str], daemon: str) -> dict[str, Any]:
    """The settings of ``daemon`` (``queen``, ``hive`` or ``worker``) in a config file:
    the file is read and checked whole (:func:`validate_config`), the daemon's section
    overrides the top-level keys, and relative paths are made absolute against the
    file's directory.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not TOML/JSON, or :class:`ConfigError`.
    """
    data = load_config_file(path)
    validate_config(data)
    known = CONFIG_KEYS[daemon]
    settings = {k: v for k, v in data.items() if k in known}
    settings.update(data.get(daemon) or {})
    base = Path(path).expanduser().absolute().parent
    for key, kind in known.items():
        if kind == "path" and key in settings:
            settings[key] = _resolve_path(settings[key], base)
    store = settings.get("store")
    if isinstance(store, str) and store.strip().startswith("sqlite:"):
        settings["store"] = "sqlite:" + _resolve_path(store.strip()[len("sqlite:") :], base)
    return settings


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
    ``schedule_wait_s``: how long an ``infer`` waits for a live worker of its model with
    room for it (below the capacity it advertises), in turn with the others waiting;
    then the job fails (a background one waits until its bound instead).
    ``cancel_timeout_s``: bound on the DELETE sent to a hive or worker when a forwarded
    job is cancelled or times out.
    ``stream_silence_s``: a forwarded job whose daemon sends nothing at all (no event, no
    keep-alive comment) for this long fails ``lost worker ...``/``lost hive ...`` (workers
    send a keep-alive every 5 s of quiet, hives every 15 s, so keep it above that).
    ``lost_worker_grace_s``: after a worker's heartbeat is older than ``heartbeat_ttl_s``,
    its in-flight ``infer`` jobs fail ``lost worker ...`` within this many seconds (or are
    retried on another worker when their retry policy allows).
    ``background_timeout_s``: how long after its creation a background response (OpenAI
    Responses API) may be queued and run, across restarts; then it ends ``failed`` (its
    job: ``Job timed out after <N>s``).
    ``store``: where jobs are kept (memory here; the CLI defaults to a SQLite file); with
    PostgreSQL the queen shares the ``pg_schema`` tables with other queens as ``node``
    (default ``<hostname>-<pid>``), and takes over the jobs of a queen that renewed no
    lease for ``lease_s`` seconds. ``retention_s``: how long finished jobs stay in memory
    (a store keeps them longer). ``cors_origins``: origins whose web pages may use the
    API (CORS; none by default); ``allowed_hosts``: ``Host`` names the queen answers on
    loopback besides its own (a reverse proxy's). ``config_file`` and ``state_dir``
    (absolute): the operator's config file and state directory, given to a local hive
    started with ``hive_start``.
    """

    hives: dict[str, HiveEntry] = field(default_factory=dict)
    token: str | None = None
    advertise_url: str | None = None
    heartbeat_ttl_s: float = 5.0
    schedule_wait_s: float = 10.0
    cancel_timeout_s: float = 3.0
    stream_silence_s: float = 60.0
    lost_worker_grace_s: float = 0.5
    background_timeout_s: float = 3600.0
    ssh_timeout_s: float = 15.0
    max_concurrent: int | None = None
    store: StoreSpec = field(default_factory=lambda: StoreSpec("memory"))
    pg_schema: str = "trio_jobs"
    node: str | None = None
    lease_s: float = 10.0
    retention_s: float = 600.0
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    config_file: str | None = None
    state_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("stream_silence_s", "lost_worker_grace_s", "background_timeout_s"):
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


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON file into a dict, as it is (:func:`read_config`
    checks it and picks one daemon's settings; :data:`CONFIG_KEYS` lists the keys)."""
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
