"""The ``trio-jobs`` console script (usage: :mod:`servers.cli._parser`).

- ``_parser``: the command line; ``_keeper``: submit and follow operations;
  ``_daemons``: start the queen, hive or worker; :mod:`servers._printer` shows streams.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from .._daemon import setup_logging
from .._printer import Printer
from ._daemons import DAEMONS
from ._keeper import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, run_operation
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
            from .._store import StoreUnavailable

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
