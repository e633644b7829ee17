"""The keeper: submit an operation to the queen, follow its stream, cancel on interrupt."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Callable, Sequence
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

from .._printer import Printer
from ..operations import parse_operation

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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


async def run_jobs_list(args: argparse.Namespace) -> int:
    printer = Printer(json_lines=args.json)
    async with JobClient(args.queen, token=args.token) as client:
        try:
            jobs = await client.list_jobs(state=args.state, tag=args.tag)
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
