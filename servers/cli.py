"""``trio-jobs``: start the daemons, or (the keeper) submit operations to a queen.

Daemons: ``trio-jobs queen|hive|worker [--host H] [--port P] [--config F] ...``; with
``--port 0`` the first stdout line is ``listening on http://HOST:PORT``; SIGTERM or SIGINT
stops them gracefully.

Keeper: ``trio-jobs [--queen URL] [--json] [--timeout S] <command> ...`` submits one
operation to the queen and shows its narration live until the terminal signal. Exit codes:
0 on ``[DONE]``, 1 on ``[ERROR]``/``[CANCELLED]``/timeout/unreachable queen, 2 on bad usage,
130 when interrupted (Ctrl-C or SIGTERM; the job is cancelled on the server first).
``--detach`` prints the job id and exits; ``trio-jobs follow JOB_ID`` shows a job's stream
from its start (Ctrl-C there stops watching and leaves the job running).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import trio
from pydantic import ValidationError

from trio_jobs import (
    HTTPStatusError,
    InvalidJobState,
    JobClient,
    JobNotFound,
    NarrationEvent,
    Signal,
    StreamEndedWithoutSignal,
    TerminalSignal,
    TransportError,
)

from ._daemon import is_loopback, setup_logging
from ._units import human_bytes
from .operations import parse_operation

__all__ = ["main", "build_parser", "Printer", "DEFAULT_QUEEN_URL"]

DEFAULT_QUEEN_URL = "http://127.0.0.1:7833"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---- output ---------------------------------------------------------------------------------


class Printer:
    """Shows a job's stream: human lines, inline tokens and progress bars, or JSON lines."""

    def __init__(self, *, json_lines: bool, out: TextIO | None = None) -> None:
        self.json_lines = json_lines
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self._inline = False
        self._bar = False

    def _end_line(self) -> None:
        if self._inline or self._bar:
            self.out.write("\n")
            self._inline = self._bar = False

    def item(self, item: NarrationEvent | TerminalSignal) -> None:
        if self.json_lines:
            self.out.write(item.wire + "\n")
            self.out.flush()
            return
        if isinstance(item, TerminalSignal):
            self._end_line()
            self.out.write(item.wire + "\n")
        elif item.action == "token":
            if self._bar:
                self._end_line()
            self.out.write(str(item.fields.get("token", item.human)))
            self._inline = True
        elif isinstance(item.fields.get("progress"), dict):
            self._progress(item)
        else:
            self._end_line()
            self.out.write(f"[{item.actor}] {item.human}\n")
        self.out.flush()

    def _progress(self, item: NarrationEvent) -> None:
        progress: dict[str, Any] = item.fields["progress"]
        done, total = progress.get("done") or 0, progress.get("total")
        unit = progress.get("unit")
        if not self.tty:
            self._end_line()
            self.out.write(f"[{item.actor}] {item.human}\n")
            return
        if self._inline:
            self._end_line()
        width = 30
        if total:
            fraction = min(max(done / total, 0.0), 1.0)
            filled = int(width * fraction)
            bar = "#" * filled + "-" * (width - filled)
            amount = (
                f"{human_bytes(done)}/{human_bytes(total)}"
                if unit == "bytes"
                else f"{done}/{total}"
            )
            line = f"[{bar}] {fraction * 100:5.1f}% {amount}"
        else:
            line = f"[{'?' * width}] {human_bytes(done) if unit == 'bytes' else done}"
        rate = item.fields.get("rate_bytes_s")
        if isinstance(rate, int | float) and unit == "bytes":
            line += f" {human_bytes(rate)}/s"
        self.out.write("\r" + line + "\x1b[K")
        self._bar = True

    def note(self, text: str) -> None:
        """A line about the keeper itself (job id, interruption), on stderr."""
        if not self.json_lines:
            self._end_line()
            self.out.flush()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def error(self, message: str) -> None:
        """An ``[ERROR]`` the keeper decided itself (bad request, unreachable queen)."""
        self._end_line()
        self.out.write(TerminalSignal(Signal.ERROR, message).wire + "\n")
        self.out.flush()


# ---- the keeper ----------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if getattr(args, "timeout", None) is not None:
        options["timeout_s"] = args.timeout
    if getattr(args, "priority", None):
        options["priority"] = args.priority
    return options


async def _cancel_on_server(client: JobClient, job_id: str, printer: Printer) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(5.0):
        try:
            await client.cancel(job_id)
            printer.note(f"cancelled job {job_id} on the server")
        except (InvalidJobState, JobNotFound):
            printer.note(f"job {job_id} had already finished")
        except TransportError as exc:
            printer.note(f"could not cancel job {job_id}: {exc}")


class _Run:
    """What the keeper learned while following a job (read after an interruption)."""

    job_id: str | None = None
    interrupted = False


async def _submit_and_follow(
    client: JobClient,
    args: argparse.Namespace,
    body: dict[str, Any] | None,
    printer: Printer,
    run: _Run,
) -> int:
    """Submit ``body`` (or, when None, take ``run.job_id``) and follow the job's stream."""
    if body is not None:
        try:
            run.job_id = await client.submit(body, **_options(args))
        except HTTPStatusError as exc:
            printer.error(f"the queen refused the job: {exc}")
            return EXIT_FAILED
        except TransportError as exc:
            printer.error(f"cannot reach the queen at {args.queen}: {exc}")
            return EXIT_FAILED
        if args.detach:
            print(json.dumps({"job_id": run.job_id}) if args.json else run.job_id)
            return EXIT_OK
        printer.note(f"job {run.job_id}")
    job_id = run.job_id
    assert job_id is not None
    terminal: TerminalSignal | None = None
    lost: str | None = None
    # The server enforces --timeout; this guard only covers a queen that stops answering.
    guard = math.inf if args.timeout is None else args.timeout + 30.0
    with trio.move_on_after(guard):
        try:
            async with client.stream(job_id) as events:
                async for item in events:
                    printer.item(item)
                    if isinstance(item, TerminalSignal):
                        terminal = item
        except JobNotFound:
            printer.error(f"unknown job {job_id}")
            return EXIT_FAILED
        except (StreamEndedWithoutSignal, TransportError) as exc:
            lost = str(exc)
    if terminal is None:
        if lost is None:
            await _cancel_on_server(client, job_id, printer)
            lost = f"no terminal signal within {guard:g}s"
        printer.error(f"lost job {job_id}: {lost}")
        return EXIT_FAILED
    return EXIT_OK if terminal.signal is Signal.DONE else EXIT_FAILED


async def run_operation(
    args: argparse.Namespace, body: dict[str, Any] | None, job_id: str | None = None
) -> int:
    """Submit ``body`` to the queen (or follow the existing job ``job_id``) to its end.

    SIGINT/SIGTERM (Ctrl-C) stop following and give exit code 130; a job this call
    submitted is cancelled on the server first (bounded), a job it only follows is not.
    """
    printer = Printer(json_lines=args.json)
    if body is not None:
        try:
            parse_operation(body)
        except ValidationError as exc:
            printer.error(f"invalid operation: {_validation_text(exc)}")
            return EXIT_USAGE
    run = _Run()
    run.job_id = job_id
    code = EXIT_INTERRUPTED
    async with JobClient(args.queen, token=args.token) as client:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for _ in signals:
                        run.interrupted = True
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                code = await _submit_and_follow(client, args, body, printer, run)
                nursery.cancel_scope.cancel()
        if run.interrupted:
            printer.note("interrupted")
            if body is not None and run.job_id is not None:
                await _cancel_on_server(client, run.job_id, printer)
            return EXIT_INTERRUPTED
    return code


async def run_follow(args: argparse.Namespace) -> int:
    """``trio-jobs follow JOB_ID``: show an existing job's stream from its start."""
    return await run_operation(args, None, args.job_id)


def _validation_text(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
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


async def run_jobs_list(args: argparse.Namespace) -> int:
    printer = Printer(json_lines=args.json)
    async with JobClient(args.queen, token=args.token) as client:
        try:
            jobs = await client.list_jobs(
                args.state,
                args.tag or None,
                operation=args.operation,
                since=args.since,
                until=args.until,
                limit=args.limit,
                order=args.order,
            )
        except HTTPStatusError as exc:
            printer.error(f"cannot list jobs: {exc}")
            return EXIT_USAGE if exc.status_code == 422 else EXIT_FAILED
        except TransportError as exc:
            printer.error(f"cannot list jobs at {args.queen}: {exc}")
            return EXIT_FAILED
    if args.json:
        for job in jobs:
            print(json.dumps(job, separators=(",", ":")))
    else:
        for job in jobs:
            operation = (job.get("payload") or {}).get("operation", "?")
            error = f"  {job['error']}" if job.get("error") else ""
            print(f"{job['job_id']}  {job['state']:<9}  {operation:<14} {job['created_at']}{error}")
    return EXIT_OK


async def run_cancel(args: argparse.Namespace) -> int:
    printer = Printer(json_lines=args.json)
    async with JobClient(args.queen, token=args.token) as client:
        try:
            record = await client.cancel(args.job_id)
        except JobNotFound:
            printer.error(f"unknown job {args.job_id}")
            return EXIT_FAILED
        except InvalidJobState:
            printer.error(f"job {args.job_id} has already finished")
            return EXIT_FAILED
        except TransportError as exc:
            printer.error(f"cannot reach the queen at {args.queen}: {exc}")
            return EXIT_FAILED
    print(json.dumps(record) if args.json else f"{record['job_id']} {record['state']}")
    return EXIT_OK


async def run_get(args: argparse.Namespace) -> int:
    printer = Printer(json_lines=args.json)
    async with JobClient(args.queen, token=args.token) as client:
        try:
            record = await client.get(args.job_id)
        except JobNotFound:
            printer.error(f"unknown job {args.job_id}")
            return EXIT_FAILED
        except TransportError as exc:
            printer.error(f"cannot reach the queen at {args.queen}: {exc}")
            return EXIT_FAILED
    print(json.dumps(record, indent=None if args.json else 2))
    return EXIT_OK


# ---- operation subcommands ----------------------------------------------------------------

BodyBuilder = Callable[[argparse.Namespace], dict[str, Any]]


def _submit_body(args: argparse.Namespace) -> dict[str, Any]:
    text: str = args.body
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        with open(text[1:], encoding="utf-8") as file:
            text = file.read()
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"trio-jobs submit: the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise SystemExit("trio-jobs submit: the body must be a JSON object")
    for pair in args.set or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"trio-jobs submit: --set wants key=value, got {pair!r}")
        try:
            body[key] = json.loads(value)
        except ValueError:
            body[key] = value
    return body


def _infer_body(args: argparse.Namespace) -> dict[str, Any]:
    prompt = args.prompt_opt if args.prompt_opt is not None else args.prompt
    if prompt is None:
        raise SystemExit("trio-jobs infer: a prompt is required (positional or --prompt)")
    body: dict[str, Any] = {
        "operation": "infer",
        "model": args.model,
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
    }
    if args.seed is not None:
        body["seed"] = args.seed
    if args.hive is not None:
        body["hive_id"] = args.hive
    return body


def _fields_body(operation: str, fields: Sequence[str]) -> BodyBuilder:
    def build(args: argparse.Namespace) -> dict[str, Any]:
        body: dict[str, Any] = {"operation": operation}
        for name in fields:
            value = getattr(args, name)
            if value is not None:
                body[name] = value
        return body

    return build


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
        "--timeout", type=float, default=default, help="job timeout in seconds (timeout_s)"
    )
    parser.add_argument(
        "--priority",
        choices=["low", "normal", "high", "critical"],
        default=default,
        help="job priority",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        default=False if top else default,
        help="print the job id and exit without following (see: trio-jobs follow)",
    )


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


def _web_policy(args: argparse.Namespace, data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``--cors-origin`` and ``--allowed-host`` (or the config's lists), validated."""
    from trio_jobs.http import SitePolicy

    lists: list[list[str]] = []
    for flag, key in ((args.cors_origin, "cors_origins"), (args.allowed_host, "allowed_hosts")):
        value = _pick(flag, data, key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SystemExit(f"trio-jobs {args.command}: {key} must be a list of strings")
        lists.append(value)
    try:
        SitePolicy(*lists)
    except ValueError as exc:
        raise SystemExit(f"trio-jobs {args.command}: {exc}") from None
    return lists[0], lists[1]


def _store_options(parser: argparse.ArgumentParser, schema: str) -> None:
    from ._store import STORE_HELP

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
    worker.add_argument("--parent-pid", type=int, default=None, help="stop when it exits")

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
    p.set_defaults(
        build=_fields_body(
            "worker_spawn",
            ("hive_id", "model", "worker", "device", "backend", "upstream_url", "token_delay_s"),
        )
    )
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
    return parser


# ---- daemons ----------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The daemon's settings from ``--config`` (flags given on the command line win)."""
    from .queen import load_config_file

    if not args.config:
        return {}
    try:
        data = load_config_file(args.config)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"trio-jobs {args.command}: cannot read {args.config}: {exc}") from None
    # One file can serve every daemon: a [queen], [hive] or [worker] table overrides the
    # top-level keys for that daemon.
    section = data.get(args.command)
    if isinstance(section, dict):
        data = {**data, **section}
    return data


def _pick(flag: Any, config: dict[str, Any], key: str, default: Any) -> Any:
    if flag is not None:
        return flag
    return config.get(key, default)


def _check_bind(args: argparse.Namespace, host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise SystemExit(
            f"trio-jobs {args.command}: binding {host} (not loopback) needs --token "
            "(or $TRIO_JOBS_TOKEN)"
        )


def _store(args: argparse.Namespace, data: dict[str, Any], daemon: str) -> Any:
    """The daemon's store spec (``--store``/``--state-dir`` or the config file), with its
    SQLite file locked for this process; exits with a message when that fails."""
    from ._store import StoreInUse, lock_store, resolve_store

    try:
        spec = resolve_store(args.store, args.state_dir, data, daemon=daemon)
        lock = lock_store(spec)
    except (ValueError, OSError, StoreInUse) as exc:
        raise SystemExit(f"trio-jobs {args.command}: {exc}") from None
    _HELD_LOCKS.append(lock)
    return spec


def _max_concurrent(args: argparse.Namespace, data: dict[str, Any]) -> int | None:
    value = _pick(args.max_concurrent, data, "max_concurrent", None)
    if value is None:
        return None
    if int(value) < 1:
        raise SystemExit(f"trio-jobs {args.command}: --max-concurrent must be >= 1")
    return int(value)


_HELD_LOCKS: list[Any] = []
"""Open lock files of the stores in use (released when the process exits)."""


def run_queen(args: argparse.Namespace) -> int:
    from .queen import QueenConfig, hives_from_config, parse_hive_flag, serve_queen

    data = _config(args)
    host = _pick(args.host, data, "host", "127.0.0.1")
    port = _pick(args.port, data, "port", 7833)
    token = args.token or data.get("token")
    _check_bind(args, host, token)
    try:
        hives = hives_from_config(data)
        for flag in args.hive:
            entry = parse_hive_flag(flag)
            hives[entry.alias] = entry
    except ValueError as exc:
        raise SystemExit(f"trio-jobs queen: {exc}") from None
    if not hives:
        hives["localhost"] = parse_hive_flag("localhost=http://127.0.0.1:7834")
    cors_origins, allowed_hosts = _web_policy(args, data)
    config = QueenConfig(
        hives=hives,
        token=token,
        advertise_url=_pick(args.advertise_url, data, "advertise_url", None),
        heartbeat_ttl_s=float(_pick(args.heartbeat_ttl, data, "heartbeat_ttl_s", 5.0)),
        schedule_wait_s=float(_pick(args.schedule_wait, data, "schedule_wait_s", 10.0)),
        store=_store(args, data, "queen"),
        pg_schema=_pick(args.pg_schema, data, "pg_schema", "trio_jobs"),
        node=_pick(args.node, data, "node", None),
        lease_s=float(_pick(args.lease, data, "lease_s", 10.0)),
        retention_s=float(_pick(args.retention, data, "retention_s", 600.0)),
        max_concurrent=_max_concurrent(args, data),
        cors_origins=cors_origins,
        allowed_hosts=allowed_hosts,
    )
    trio.run(lambda: serve_queen(config, host=host, port=int(port)))
    return EXIT_OK


def run_hive(args: argparse.Namespace) -> int:
    from .hive import HiveConfig, serve_hive

    data = _config(args)
    host = _pick(args.host, data, "host", "127.0.0.1")
    port = _pick(args.port, data, "port", 7834)
    token = args.token or data.get("token")
    _check_bind(args, host, token)
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
    from .worker import WorkerConfig, serve_worker

    data = _config(args)
    host = _pick(args.host, data, "host", "127.0.0.1")
    port = _pick(args.port, data, "port", 0)
    token = args.token or data.get("token")
    _check_bind(args, host, token)
    config = WorkerConfig(
        model=_pick(args.model, data, "model", "tiny"),
        hive_id=_pick(args.hive_id, data, "hive_id", None),
        queen_url=_pick(args.queen, data, "queen_url", None),
        backend=_pick(args.backend, data, "backend", "tiny"),
        upstream_url=_pick(args.upstream_url, data, "upstream_url", None),
        upstream_model=_pick(args.upstream_model, data, "upstream_model", None),
        token_delay_s=float(_pick(args.token_delay, data, "token_delay_s", 0.0)),
        heartbeat_s=float(_pick(args.heartbeat_s, data, "heartbeat_s", 1.0)),
        parent_pid=args.parent_pid,
        token=token,
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


def _leaf(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` exception in ``exc`` (looking inside exception groups)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _leaf(inner, kind)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``trio-jobs`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in DAEMONS:
        setup_logging(args.verbose)
        try:
            return DAEMONS[args.command](args)
        except BaseException as exc:
            if _leaf(exc, KeyboardInterrupt) is not None:  # before the handlers were set
                return EXIT_INTERRUPTED
            from ._store import StoreUnavailable

            # the address is in use, not ours, ...; the job store cannot be opened
            error = _leaf(exc, OSError) or _leaf(exc, StoreUnavailable)
            if error is None:
                raise
            sys.stderr.write(f"trio-jobs {args.command}: cannot serve: {error}\n")
            return EXIT_FAILED
    handler = getattr(args, "handler", None)
    if handler is not None:
        code: int = trio.run(handler, args)
        return code
    try:
        body = args.build(args)
    except OSError as exc:
        parser.exit(EXIT_USAGE, f"trio-jobs {args.command}: {exc}\n")
    code = trio.run(run_operation, args, body)
    return code


if __name__ == "__main__":
    sys.exit(main())
