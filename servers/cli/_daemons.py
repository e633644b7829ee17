"""``trio-jobs queen|hive|worker``: a daemon's settings from its flags and config file."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import trio

from .._daemon import is_loopback
from ._keeper import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def _usage(args: argparse.Namespace, message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Stop before serving: ``trio-jobs DAEMON: message`` on stderr, exit 2 (bad usage)."""
    sys.stderr.write(f"trio-jobs {args.command}: {message}\n")
    raise SystemExit(code)


def _web_policy(args: argparse.Namespace, data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``--cors-origin`` and ``--allowed-host`` (or the config's lists), validated."""
    from trio_jobs.http import SitePolicy

    lists: list[list[str]] = []
    for flag, key in ((args.cors_origin, "cors_origins"), (args.allowed_host, "allowed_hosts")):
        value = _pick(flag, data, key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _usage(args, f"{key} must be a list of strings")
        lists.append(value)
    try:
        SitePolicy(*lists)
    except ValueError as exc:
        _usage(args, str(exc))
    return lists[0], lists[1]


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The daemon's settings from ``--config`` (flags given on the command line win); a
    config file with an unknown key or section, or a wrong value, exits 2 naming it."""
    from ..queen import read_config

    if not args.config:
        return {}
    try:
        return read_config(args.config, args.command)
    except OSError as exc:
        _usage(args, f"cannot read {args.config}: {exc.strerror or exc}")
    except ValueError as exc:
        _usage(args, f"{args.config}: {exc}")


def _state_dir(args: argparse.Namespace) -> str | None:
    """``--state-dir`` as an absolute path (relative to where the daemon was started)."""
    if args.state_dir is None:
        return None
    return os.path.abspath(os.path.expanduser(str(args.state_dir)))


def _pick(flag: Any, config: dict[str, Any], key: str, default: Any) -> Any:
    if flag is not None:
        return flag
    return config.get(key, default)


def check_bind(args: argparse.Namespace, host: str, token: str | None) -> None:
    """A daemon that binds a non-loopback address needs a token (exits 2 otherwise)."""
    if not is_loopback(host) and not token:
        _usage(args, f"binding {host} (not loopback) needs --token (or $TRIO_JOBS_TOKEN)")


def _store(args: argparse.Namespace, data: dict[str, Any], daemon: str) -> Any:
    """The daemon's store spec (``--store``/``--state-dir`` or the config file), with its
    SQLite file locked for this process; exits with a message when that fails."""
    from .._store import StoreInUse, lock_store, resolve_store

    try:
        spec = resolve_store(args.store, _state_dir(args), data, daemon=daemon)
    except ValueError as exc:
        _usage(args, str(exc))
    try:
        lock = lock_store(spec)
    except (OSError, StoreInUse) as exc:
        _usage(args, str(exc), EXIT_FAILED)
    _HELD_LOCKS.append(lock)
    return spec


def _max_concurrent(args: argparse.Namespace, data: dict[str, Any]) -> int | None:
    value = _pick(args.max_concurrent, data, "max_concurrent", None)
    if value is None:
        return None
    if int(value) < 1:
        _usage(args, "--max-concurrent must be >= 1")
    return int(value)


_HELD_LOCKS: list[Any] = []
"""Open lock files of the stores in use (released when the process exits)."""


def run_queen(args: argparse.Namespace) -> int:
    from ..queen import QueenConfig, hives_from_config, parse_hive_flag, serve_queen

    data = _config(args)
    host = _pick(args.host, data, "host", "127.0.0.1")
    port = _pick(args.port, data, "port", 7833)
    token = args.token or data.get("token")
    check_bind(args, host, token)
    try:
        hives = hives_from_config(data)
        for flag in args.hive:
            entry = parse_hive_flag(flag)
            hives[entry.alias] = entry
    except ValueError as exc:
        _usage(args, str(exc))
    if not hives:
        hives["localhost"] = parse_hive_flag("localhost=http://127.0.0.1:7834")
    cors_origins, allowed_hosts = _web_policy(args, data)
    try:
        config = QueenConfig(
            hives=hives,
            token=token,
            advertise_url=_pick(args.advertise_url, data, "advertise_url", None),
            heartbeat_ttl_s=float(_pick(args.heartbeat_ttl, data, "heartbeat_ttl_s", 5.0)),
            schedule_wait_s=float(_pick(args.schedule_wait, data, "schedule_wait_s", 10.0)),
            stream_silence_s=float(_pick(args.stream_silence, data, "stream_silence_s", 60.0)),
            lost_worker_grace_s=float(data.get("lost_worker_grace_s", 0.5)),
            background_timeout_s=float(
                _pick(args.background_timeout, data, "background_timeout_s", 3600.0)
            ),
            store=_store(args, data, "queen"),
            pg_schema=_pick(args.pg_schema, data, "pg_schema", "trio_jobs"),
            node=_pick(args.node, data, "node", None),
            lease_s=float(_pick(args.lease, data, "lease_s", 10.0)),
            retention_s=float(_pick(args.retention, data, "retention_s", 600.0)),
            max_concurrent=_max_concurrent(args, data),
            cors_origins=cors_origins,
            allowed_hosts=allowed_hosts,
            config_file=os.path.abspath(os.path.expanduser(args.config)) if args.config else None,
            state_dir=_state_dir(args) or data.get("state_dir"),
        )
    except ValueError as exc:
        _usage(args, str(exc))
    trio.run(lambda: serve_queen(config, host=host, port=int(port)))
    return EXIT_OK


def run_hive(args: argparse.Namespace) -> int:
    from ..hive import HiveConfig, serve_hive

    data = _config(args)
    host = _pick(args.host, data, "host", "127.0.0.1")
    port = _pick(args.port, data, "port", 7834)
    token = args.token or data.get("token")
    check_bind(args, host, token)
    config = HiveConfig(
        hive_id=_pick(args.hive_id, data, "hive_id", "localhost"),
        models_dir=_pick(args.models_dir, data, "models_dir", "models"),
        model_source=_pick(args.model_source, data, "model_source", None),
        queen_url=_pick(args.queen, data, "queen_url", None),
        worker_host=_pick(args.worker_host, data, "worker_host", "127.0.0.1"),
        worker_grace_s=float(_pick(args.worker_grace, data, "worker_grace_s", 5.0)),
        heartbeat_s=float(_pick(args.heartbeat_s, data, "heartbeat_s", 1.0)),
        token=token,
    )
    hive_id = config.hive_id
    config.store = _store(args, data, "hive" if hive_id == "localhost" else f"hive-{hive_id}")
    config.pg_schema = _pick(args.pg_schema, data, "pg_schema", "trio_jobs_hive")
    config.retention_s = float(_pick(args.retention, data, "retention_s", 600.0))
    config.max_concurrent = _max_concurrent(args, data)
    config.cors_origins, config.allowed_hosts = _web_policy(args, data)
    trio.run(lambda: serve_hive(config, host=host, port=int(port)))
    return EXIT_OK


def run_worker(args: argparse.Namespace) -> int:
    from ..worker import WorkerConfig, serve_worker

    data = _config(args)
    host = _pick(args.host, data, "host", "127.0.0.1")
    port = _pick(args.port, data, "port", 0)
    token = args.token or data.get("token")
    check_bind(args, host, token)
    config = WorkerConfig(
        model=_pick(args.model, data, "model", "tiny"),
        hive_id=_pick(args.hive_id, data, "hive_id", None),
        queen_url=_pick(args.queen, data, "queen_url", None),
        backend=_pick(args.backend, data, "backend", "tiny"),
        upstream_url=_pick(args.upstream_url, data, "upstream_url", None),
        upstream_model=_pick(args.upstream_model, data, "upstream_model", None),
        token_delay_s=float(_pick(args.token_delay, data, "token_delay_s", 0.0)),
        heartbeat_s=float(_pick(args.heartbeat_s, data, "heartbeat_s", 1.0)),
        stop_grace_s=float(_pick(args.stop_grace, data, "stop_grace_s", 2.0)),
        parent_pid=args.parent_pid,
        token=token,
        max_concurrent=_max_concurrent(args, data) or 4,
    )
    if args.worker_id or data.get("worker_id"):
        config.worker_id = _pick(args.worker_id, data, "worker_id", None)
    try:
        trio.run(lambda: serve_worker(config, host=host, port=int(port)))
    except ValueError as exc:
        raise SystemExit(f"trio-jobs worker: {exc}") from None
    return EXIT_OK


DAEMONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "queen": run_queen,
    "hive": run_hive,
    "worker": run_worker,
}
