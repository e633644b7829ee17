"""The keeper: submit an operation to the queen, follow its stream, cancel on interrupt.

Exit codes: 0 ``[DONE]``; 1 ``[ERROR]``/``[CANCELLED]``/timeout/unreachable queen; 2 bad
usage (nothing is submitted); 130 interrupted (SIGINT/SIGTERM); 141 stdout closed (its
reader went away, as ``| head -n 3`` does). On 130 and 141 a job this keeper submitted is
cancelled on the server first (bounded); a job it only follows is left running.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from pydantic import ValidationError

from trio_jobs import (
    HTTPStatusError,
    InvalidJobState,
    JobClient,
    JobNotFound,
    Signal,
    StreamEndedWithoutSignal,
    TerminalSignal,
    TransportError,
)
from trio_jobs.http._options import OPTION_KEYS, split_job_options

from .._printer import OutputClosed, Printer, output_is_pipe, pipe_reader_gone
from ..operations import parse_operation

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_OUTPUT_CLOSED = 0, 1, 2, 130, 141

OPTION_FLAGS = {
    "timeout_s": "--timeout",
    "priority": "--priority",
    "retry": "--retry",
    "tags": "--tag",
    "metadata": "--metadata",
    "on_disconnect": "--on-disconnect",
    "expires_s": "--expires",
}
"""Each job option and the flag that sets it (the flags' dests are the option names)."""

PIPE_POLL_S = 0.2
"""Pause of the pipe watcher after a wake-up that was not its reader going away."""


class UsageError(Exception):
    """The command line asks for something invalid: exit 2, nothing submitted."""


def _validation_text(exc: ValidationError, flags: dict[str, str] | None = None) -> str:
    """Pydantic's errors as ``loc: message``; a job option also names its flag."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        flag = (flags or {}).get(str(err["loc"][0])) if err["loc"] else None
        parts.append(f"{loc} ({flag}): {err['msg']}" if flag else f"{loc}: {err['msg']}")
    return "; ".join(parts)


def job_options(
    args: argparse.Namespace, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``body`` into the operation and its job options, with the flags (``--timeout``,
    ``--retry``, ``--tag``, ...) on top of the options the body holds; ``--tag`` adds to
    the body's ``tags``.

    The options are validated by the job endpoint's own validation
    (:func:`trio_jobs.http._options.split_job_options`), so what the queen would refuse
    with a 422 is refused here before anything is sent.

    Raises:
        UsageError: an option is invalid (naming the option and its flag).
    """
    merged = dict(body)
    for name in OPTION_KEYS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "tags" and isinstance(merged.get("tags"), dict):
            value = {**merged["tags"], **value}
        merged[name] = value
    try:
        payload, _ = split_job_options(merged)
    except ValidationError as exc:
        raise UsageError(f"invalid job options: {_validation_text(exc, OPTION_FLAGS)}") from None
    return payload, {key: merged[key] for key in OPTION_KEYS if key in merged}


async def _cancel_on_server(client: JobClient, job_id: str, printer: Printer) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(5.0):
        try:
            await client.cancel(job_id)
            printer.note(f"cancelled job {job_id} on the server")
        except (InvalidJobState, JobNotFound):
            printer.note(f"job {job_id} had already finished")
        except TransportError as exc:
            printer.note(f"could not cancel job {job_id}: {exc}")


@dataclass
class _Run:
    """What the keeper learned while following a job (read after it stopped following)."""

    job_id: str | None = None
    interrupted: bool = False
    output_closed: bool = False


async def _submit_and_follow(
    client: JobClient,
    args: argparse.Namespace,
    submission: tuple[dict[str, Any], dict[str, Any]] | None,
    printer: Printer,
    run: _Run,
) -> int:
    """Submit ``(operation, options)`` (or, when None, take ``run.job_id``) and follow the
    job's stream."""
    if submission is not None:
        body, options = submission
        try:
            run.job_id = await client.submit(body, **options)
        except HTTPStatusError as exc:
            printer.error(f"the queen refused the job: {exc}")
            return EXIT_FAILED
        except TransportError as exc:
            printer.error(f"cannot reach the queen at {args.queen}: {exc}")
            return EXIT_FAILED
        printer.job_id = run.job_id
        if args.detach:
            printer.line(json.dumps({"job_id": run.job_id}) if args.json else run.job_id)
            return EXIT_OK
        printer.note(f"job {run.job_id}")
    job_id = run.job_id
    assert job_id is not None
    printer.job_id = job_id
    terminal: TerminalSignal | None = None
    lost: str | None = None
    # The server enforces the job's timeout; this guard only covers a queen that stops
    # answering (for ``follow``, --timeout is the only one).
    timeout = args.timeout_s if submission is None else submission[1].get("timeout_s")
    guard = math.inf if timeout is None else float(timeout) + 30.0
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

    SIGINT/SIGTERM (Ctrl-C) stop following and give exit code 130; stdout's reader going
    away (a write fails with EPIPE, or a pipe's reader is seen closed while the job is
    quiet) gives 141 without a traceback. Either way a job this call submitted is
    cancelled on the server first (bounded); a job it only follows is not. When both come
    together (Ctrl-C on ``trio-jobs ... | tee log`` stops ``tee`` too), 130 wins.
    """
    printer = Printer(json_lines=args.json)
    submission: tuple[dict[str, Any], dict[str, Any]] | None = None
    if body is not None:
        try:
            submission = job_options(args, body)
            parse_operation(submission[0])
        except UsageError as exc:
            printer.error(str(exc))
            return EXIT_USAGE
        except ValidationError as exc:
            printer.error(f"invalid operation: {_validation_text(exc)}")
            return EXIT_USAGE
    run = _Run(job_id)
    code = EXIT_FAILED
    async with JobClient(args.queen, token=args.token) as client:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                following = trio.CancelScope()

                async def on_signal() -> None:
                    async for _ in signals:
                        run.interrupted = True
                        following.cancel()
                        return

                async def watch_output() -> None:
                    """A quiet job writes nothing: notice a closed pipe without a write.

                    A pipe's write end never turns readable; the kernel reports it
                    (EPOLLERR) only once the read end is closed."""
                    while True:
                        await trio.lowlevel.wait_readable(printer.out.fileno())
                        if pipe_reader_gone(printer.out):
                            break
                        await trio.sleep(PIPE_POLL_S)  # woken for nothing: do not spin
                    printer.mark_closed()
                    run.output_closed = True
                    following.cancel()

                nursery.start_soon(on_signal)
                if output_is_pipe(printer.out):
                    nursery.start_soon(watch_output)
                with following:
                    try:
                        code = await _submit_and_follow(client, args, submission, printer, run)
                    except OutputClosed:
                        run.output_closed = True
                stopped = run.interrupted or run.output_closed
                if stopped and submission is not None and run.job_id is not None:
                    # on_signal still listens meanwhile: a Ctrl-C that also closed the
                    # pipe (``| tee``) is seen before the exit code is chosen
                    await _cancel_on_server(client, run.job_id, printer)
                nursery.cancel_scope.cancel()
    if run.interrupted:
        printer.note("interrupted")
        return EXIT_INTERRUPTED
    if run.output_closed:
        return EXIT_OUTPUT_CLOSED
    return code


async def run_follow(args: argparse.Namespace) -> int:
    """``trio-jobs follow JOB_ID``: show an existing job's stream from its start."""
    return await run_operation(args, None, args.job_id)


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
            printer.line(json.dumps(job, separators=(",", ":")))
    else:
        for job in jobs:
            operation = (job.get("payload") or {}).get("operation", "?")
            error = f"  {job['error']}" if job.get("error") else ""
            printer.line(
                f"{job['job_id']}  {job['state']:<9}  {operation:<14} {job['created_at']}{error}"
            )
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
    printer.line(json.dumps(record) if args.json else f"{record['job_id']} {record['state']}")
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
    printer.line(json.dumps(record, indent=None if args.json else 2))
    return EXIT_OK


# ---- operation bodies ------------------------------------------------------------------

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
        raise UsageError(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError("the body must be a JSON object")
    for pair in args.set or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set wants key=value, got {pair!r}")
        try:
            body[key] = json.loads(value)
        except ValueError:
            body[key] = value
    return body


def _infer_body(args: argparse.Namespace) -> dict[str, Any]:
    prompt = args.prompt_opt if args.prompt_opt is not None else args.prompt
    if prompt is None:
        raise UsageError("a prompt is required (positional or --prompt)")
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
