"""``trio-jobs``: start the daemons, or (the keeper) submit operations to a queen.

Daemons: ``trio-jobs queen|hive|worker [--host H] [--port P] [--config F] ...``; with
``--port 0`` the first stdout line is ``listening on http://HOST:PORT``; SIGTERM or SIGINT
stops them gracefully. A config file with an unknown key or section exits 2 naming it.

Keeper: ``trio-jobs [--queen URL] [--json] <command> [job options] ...`` submits one
operation to the queen and shows its narration live until the terminal signal. Job options
(every command that submits a job): --timeout, --priority, --retry, --tag K=V,
--metadata, --on-disconnect, --expires. Exit codes: 0 on ``[DONE]``, 1 on
``[ERROR]``/``[CANCELLED]``/timeout/unreachable queen, 2 on bad usage (nothing is
submitted), 130 when interrupted (Ctrl-C or SIGTERM), 141 when stdout's reader went away
(``| head``); on 130 and 141 the job is cancelled on the server first. ``--json`` prints
only JSON lines, the signal as ``{"signal": "DONE"}``. ``--detach`` prints the job id and
exits; ``trio-jobs follow JOB_ID`` shows a job's stream from its start (Ctrl-C there stops
watching and leaves the job running).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ._keeper import (
    _fields_body,
    _infer_body,
    _submit_body,
    run_cancel,
    run_follow,
    run_get,
    run_jobs_list,
)

DEFAULT_QUEEN_URL = "http://127.0.0.1:7833"


def _add_keeper_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Keeper options, accepted before or after the subcommand."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--queen",
        default=os.environ.get("TRIO_JOBS_QUEEN", DEFAULT_QUEEN_URL) if top else default,
        help=f"the queen's URL (default {DEFAULT_QUEEN_URL}, or $TRIO_JOBS_QUEEN)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TRIO_JOBS_TOKEN") if top else default,
        help="bearer token (default $TRIO_JOBS_TOKEN)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else default,
        help="machine-readable output: one JSON event per line, then the signal line",
    )
    parser.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        default=default,
        metavar="S",
        help="job timeout in seconds (timeout_s); `follow` stops watching after S + 30",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        default=False if top else default,
        help="print the job id and exit without following (see: trio-jobs follow)",
    )


def _absolute_path(text: str) -> str:
    """A path flag sent to the queen: made absolute here, against the operator's cwd."""
    return os.path.abspath(os.path.expanduser(text))


def _json_value(text: str) -> Any:
    """``--metadata``: JSON text, or ``@FILE`` holding JSON."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as file:
                text = file.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not JSON: {text!r} (a string needs quotes: '\"text\"')"
        ) from None


def _retry_value(text: str) -> Any:
    """``--retry``: ``N`` (max attempts), ``key=value,...`` or a JSON object of the
    retry policy (``max_attempts``, ``backoff_base``, ``factor``, ``cap``, ``jitter``,
    ``retry_timeouts``); the values are checked with the job options."""
    text = text.strip()
    if text.isdigit():
        return {"max_attempts": int(text)}
    if text.startswith("{"):
        return _json_value(text)
    policy: dict[str, Any] = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(
                f"want N, key=value[,key=value...] or a JSON object, got {text!r}"
            )
        try:
            policy[key.strip()] = json.loads(value)
        except ValueError:
            policy[key.strip()] = value.strip()
    return policy


class _TagAction(argparse.Action):
    """``--tag key=value`` (repeatable) collected into one ``tags`` dict."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        key, sep, value = str(values).partition("=")
        if not sep or not key:
            parser.error(f"{option_string} wants key=value, got {values!r}")
        tags = dict(getattr(namespace, self.dest, None) or {})
        tags[key] = value
        setattr(namespace, self.dest, tags)


def _add_job_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The job options besides ``--timeout`` (the keys of ``POST /v1/jobs``), for the
    commands that submit a job; they win over the same keys of a ``submit`` body."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--priority",
        choices=["low", "normal", "high", "critical"],
        default=default,
        help="job priority (priority)",
    )
    parser.add_argument(
        "--retry",
        type=_retry_value,
        default=default,
        metavar="POLICY",
        help="retry a failed job: N attempts in all, or max_attempts=N,backoff_base=S,"
        "factor=F,cap=S,jitter=J,retry_timeouts=true (retry)",
    )
    parser.add_argument(
        "--tag",
        dest="tags",
        action=_TagAction,
        default=default,
        metavar="KEY=VALUE",
        help="a tag of the job (repeatable; tags)",
    )
    parser.add_argument(
        "--metadata",
        type=_json_value,
        default=default,
        metavar="JSON",
        help="any JSON kept with the job, or @FILE (metadata)",
    )
    parser.add_argument(
        "--on-disconnect",
        choices=["detach", "cancel"],
        default=default,
        help="cancel the job when its last streaming client disconnects (on_disconnect)",
    )
    parser.add_argument(
        "--expires",
        dest="expires_s",
        type=float,
        default=default,
        metavar="S",
        help="a job still queued after S seconds fails without running (expires_s)",
    )


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _keeper(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    _add_keeper_options(parser, top=False)
    return parser


def _daemon_common(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=None, help=f"port (default {port}; 0 picks a free one)"
    )
    parser.add_argument("--config", default=None, help="a TOML or JSON config file")
    parser.add_argument(
        "--token",
        default=os.environ.get("TRIO_JOBS_TOKEN"),
        help="bearer token required by the API (default $TRIO_JOBS_TOKEN)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _web_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="an origin (https://host[:port]) whose web pages may use the API (repeatable; "
        "config key cors_origins; default: none, no cross-origin use)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="a Host name answered besides localhost and loopback addresses, e.g. a reverse "
        "proxy's (repeatable; config key allowed_hosts)",
    )


def _store_options(parser: argparse.ArgumentParser, schema: str) -> None:
    from .._store import STORE_HELP

    parser.add_argument("--store", default=None, metavar="SPEC", help=STORE_HELP)
    parser.add_argument(
        "--state-dir",
        default=None,
        help="directory of the default SQLite store (default $XDG_STATE_HOME/trio-jobs "
        "or ~/.local/state/trio-jobs)",
    )
    parser.add_argument(
        "--pg-schema", default=None, help=f"PostgreSQL schema of the jobs (default {schema})"
    )
    parser.add_argument(
        "--retention",
        type=float,
        default=None,
        help="seconds finished jobs stay in memory (default 600; a store keeps them)",
    )
    parser.add_argument(
        "--max-concurrent", type=int, default=None, help="jobs run at once (default: no limit)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole ``trio-jobs`` command line."""
    parser = argparse.ArgumentParser(
        prog="trio-jobs", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    _add_keeper_options(parser, top=True)
    _add_job_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    queen = sub.add_parser("queen", help="run the queen daemon (default port 7833)")
    _daemon_common(queen, 7833)
    _web_options(queen)
    queen.add_argument(
        "--hive",
        action="append",
        default=[],
        metavar="ALIAS=URL",
        help="a hive the queen forwards to (repeatable; default localhost=http://127.0.0.1:7834)",
    )
    queen.add_argument("--advertise-url", default=None, help="the URL workers heartbeat to")
    queen.add_argument("--heartbeat-ttl", type=float, default=None, help="seconds (default 5)")
    queen.add_argument(
        "--schedule-wait", type=float, default=None, help="seconds infer waits for a worker"
    )
    queen.add_argument(
        "--stream-silence",
        type=float,
        default=None,
        help="seconds a forwarded job's daemon may send nothing (not even a keep-alive) "
        "before the job fails 'lost worker' (default 60)",
    )
    queen.add_argument(
        "--background-timeout",
        type=float,
        default=None,
        help="seconds after its creation a background response (OpenAI Responses API) "
        "may be queued and run before it ends failed (default 3600)",
    )
    _store_options(queen, "trio_jobs")
    queen.add_argument(
        "--node",
        default=None,
        help="this queen's name among queens sharing a PostgreSQL store (default "
        "HOSTNAME-PID; a stable, unique name lets a restarted queen recover its jobs at once)",
    )
    queen.add_argument(
        "--lease",
        type=float,
        default=None,
        help="shared mode: seconds after which a silent queen's jobs are taken over (default 10)",
    )

    hive = sub.add_parser("hive", help="run a hive daemon (default port 7834)")
    _daemon_common(hive, 7834)
    _web_options(hive)
    hive.add_argument("--hive-id", default=None, help="this hive's alias (default localhost)")
    hive.add_argument("--models-dir", default=None, help="where models are stored")
    hive.add_argument("--model-source", default=None, help="base URL for model_download")
    hive.add_argument("--queen", default=None, help="queen URL workers heartbeat to")
    hive.add_argument("--worker-host", default=None, help="address workers bind")
    hive.add_argument("--worker-grace", type=float, default=None, help="SIGTERM->SIGKILL s")
    hive.add_argument("--heartbeat-s", type=float, default=None, help="worker heartbeat period")
    _store_options(hive, "trio_jobs_hive")

    worker = sub.add_parser("worker", help="run a worker daemon (normally spawned by a hive)")
    _daemon_common(worker, 0)
    worker.add_argument("--worker-id", default=None)
    worker.add_argument("--model", default=None, help="model name served (default tiny)")
    worker.add_argument("--hive-id", default=None)
    worker.add_argument("--queen", default=None, help="queen URL for heartbeats")
    worker.add_argument("--backend", choices=["tiny", "openai"], default=None)
    worker.add_argument("--upstream-url", default=None, help="OpenAI-compatible server URL")
    worker.add_argument("--upstream-model", default=None, help="model name sent upstream")
    worker.add_argument("--token-delay", type=float, default=None, help="tiny: s per token")
    worker.add_argument("--heartbeat-s", type=float, default=None)
    worker.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="jobs run at once, advertised to the queen as its capacity (default 4)",
    )
    worker.add_argument("--parent-pid", type=int, default=None, help="stop when it exits")
    worker.add_argument(
        "--stop-grace",
        type=float,
        default=None,
        help="on SIGTERM, seconds jobs in flight may finish before they end "
        "'[ERROR] worker shutting down' (default 2)",
    )

    p = _keeper(sub, "submit", "submit any operation given as JSON ('-' stdin, @file)")
    p.add_argument("body")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="add/override a field")
    p.set_defaults(build=_submit_body)

    p = _keeper(sub, "infer", "generate text on a live worker")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--prompt", dest="prompt_opt", default=None)
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--hive", default=None, help="only workers of this hive")
    p.set_defaults(build=_infer_body)

    p = _keeper(sub, "status", "hives, live workers and jobs, as the queen sees them")
    p.set_defaults(build=_fields_body("status", ()))

    p = _keeper(sub, "jobs", "list the queen's jobs (from its store: finished ones too)")
    p.add_argument("--state", default=None, help="queued, running, retrying, completed, ...")
    p.add_argument(
        "--tag", action="append", default=[], help="key:value (repeat: every tag must match)"
    )
    p.add_argument("--operation", default=None, help="only jobs of this operation")
    p.add_argument("--since", default=None, help="created at or after (ISO-8601, UTC if no zone)")
    p.add_argument("--until", default=None, help="created before (ISO-8601)")
    p.add_argument("--limit", type=_positive_int, default=None, help="at most N jobs")
    p.add_argument("--order", choices=["asc", "desc"], default="asc", help="by creation time")
    p.set_defaults(handler=run_jobs_list)

    p = _keeper(sub, "cancel", "cancel a job")
    p.add_argument("job_id")
    p.set_defaults(handler=run_cancel)

    p = _keeper(sub, "follow", "show a job's narration to its end (Ctrl-C stops watching)")
    p.add_argument("job_id")
    p.set_defaults(handler=run_follow)

    p = _keeper(sub, "get", "a job's record")
    p.add_argument("job_id")
    p.set_defaults(handler=run_get)

    p = _keeper(sub, "hive-list", "configured hives")
    p.set_defaults(build=_fields_body("hive_list", ()))
    alias_ops = {
        "hive-get": "one hive",
        "hive-status": "is the hive up",
        "hive-start": "start a hive (local child, or over ssh)",
        "hive-stop": "stop a hive this queen started",
        "hive-install": "install trio-jobs on the hive host",
        "hive-uninstall": "remove trio-jobs from the hive host",
        "hive-refresh-capabilities": "ask the hive for its health record",
        "ssh-test": "check ssh to the hive host",
    }
    for name, text in alias_ops.items():
        p = _keeper(sub, name, text)
        p.add_argument("alias", nargs="?", default="localhost")
        p.set_defaults(build=_fields_body(name.replace("-", "_"), ("alias",)))
    p = sub.choices["hive-start"]
    for flag, what in (
        ("--config", "config file"),
        ("--state-dir", "state directory"),
        ("--models-dir", "models directory"),
    ):
        p.add_argument(
            flag,
            type=_absolute_path,
            default=None,
            help=f"the hive's {what} (relative to here; a local hive defaults to the queen's)",
        )
    p.set_defaults(build=_fields_body("hive_start", ("alias", "config", "state_dir", "models_dir")))

    p = _keeper(sub, "hive-import-ssh", "add the Hosts of an ssh config as hives")
    p.add_argument("ssh_config_path")
    p.add_argument("--default-hive-port", type=int, default=7834)
    p.set_defaults(build=_fields_body("hive_import_ssh", ("ssh_config_path", "default_hive_port")))

    def hive_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--hive", dest="hive_id", default="localhost", help="hive alias")

    p = _keeper(sub, "worker-spawn", "start a worker process on a hive")
    hive_opt(p)
    p.add_argument("--model", default="tiny")
    p.add_argument("--worker", default="cpu")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--backend", choices=["tiny", "openai"], default="tiny")
    p.add_argument("--upstream-url", dest="upstream_url", default=None)
    p.add_argument("--token-delay", dest="token_delay_s", type=float, default=None)
    p.add_argument(
        "--max-concurrent",
        dest="max_concurrent",
        type=int,
        default=None,
        help="jobs it runs at once, its capacity for the queen (default 4)",
    )
    fields = ("hive_id", "model", "worker", "device", "backend", "upstream_url")
    p.set_defaults(build=_fields_body("worker_spawn", (*fields, "token_delay_s", "max_concurrent")))
    p = _keeper(sub, "worker-list", "workers of a hive")
    hive_opt(p)
    p.set_defaults(build=_fields_body("worker_list", ("hive_id",)))
    for name, text in (("worker-get", "one worker"), ("worker-delete", "stop a worker")):
        p = _keeper(sub, name, text)
        p.add_argument("id")
        hive_opt(p)
        p.set_defaults(build=_fields_body(name.replace("-", "_"), ("hive_id", "id")))

    p = _keeper(sub, "model-download", "download a model file onto a hive")
    p.add_argument("model")
    p.add_argument("--url", default=None)
    p.add_argument("--sha256", default=None)
    hive_opt(p)
    p.set_defaults(build=_fields_body("model_download", ("hive_id", "model", "url", "sha256")))
    p = _keeper(sub, "model-list", "model files of a hive")
    hive_opt(p)
    p.set_defaults(build=_fields_body("model_list", ("hive_id",)))
    for name, text in (("model-get", "one model file"), ("model-delete", "remove a model file")):
        p = _keeper(sub, name, text)
        p.add_argument("id")
        hive_opt(p)
        p.set_defaults(build=_fields_body(name.replace("-", "_"), ("hive_id", "id")))
    for command in sub.choices.values():  # every command that submits a job
        if command.get_default("build") is not None:
            _add_job_options(command, top=False)
    return parser
