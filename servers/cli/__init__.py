"""The ``trio-jobs`` console script (usage: :mod:`servers.cli._parser`).

- ``_parser``: the command line; ``_keeper``: submit and follow operations;
  ``_daemons``: start the queen, hive or worker; :mod:`servers._printer` shows streams.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from .._daemon import setup_logging
from .._printer import OutputClosed, Printer, silence
from ._daemons import DAEMONS
from ._keeper import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_CLOSED,
    EXIT_USAGE,
    OPTION_FLAGS,
    UsageError,
    run_operation,
)
from ._parser import DEFAULT_QUEEN_URL, build_parser

__all__ = ["main", "build_parser", "Printer", "DEFAULT_QUEEN_URL"]


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
    """The ``trio-jobs`` console script; returns the exit code.

    Exit codes: 0 success, 1 failure, 2 bad usage, 130 interrupted, 141 stdout closed by
    its reader (see :mod:`servers.cli._keeper`)."""
    try:
        return _main(argv)
    except BaseException as exc:
        if _leaf(exc, OutputClosed) or _leaf(exc, BrokenPipeError):
            silence(sys.stdout)
            return EXIT_OUTPUT_CLOSED
        if _leaf(exc, KeyboardInterrupt) is not None:  # before the handlers were set
            return EXIT_INTERRUPTED
        raise


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in DAEMONS:
        setup_logging(args.verbose)
        try:
            return DAEMONS[args.command](args)
        except BaseException as exc:
            if _leaf(exc, KeyboardInterrupt) is not None:
                raise
            from .._store import StoreUnavailable

            # the address is in use, not ours, ...; the job store cannot be opened
            error = _leaf(exc, OSError) or _leaf(exc, StoreUnavailable)
            if error is None:
                raise
            sys.stderr.write(f"trio-jobs {args.command}: cannot serve: {error}\n")
            return EXIT_FAILED
    build = getattr(args, "build", None)
    if build is None:  # a command that submits no job takes no job option but --timeout
        given = [
            flag
            for name, flag in OPTION_FLAGS.items()
            if name != "timeout_s" and getattr(args, name, None) is not None
        ]
        if given:
            parser.exit(
                EXIT_USAGE,
                f"trio-jobs {args.command}: {', '.join(given)}: only for commands that "
                "submit a job\n",
            )
        code: int = trio.run(args.handler, args)
        return code
    try:
        body = build(args)
    except (OSError, UsageError) as exc:
        parser.exit(EXIT_USAGE, f"trio-jobs {args.command}: {exc}\n")
    code = trio.run(run_operation, args, body)
    return code
