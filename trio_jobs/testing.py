"""Pytest fixtures and stream assertions for suites that use trio-jobs.

Installed as a pytest plugin (entry point ``pytest11: trio_jobs``), so a suite that has
trio-jobs and pytest-trio installed can use, in its trio tests:

- ``trio_jobs_registry``: a fresh :class:`~trio_jobs.JobRegistry`;
- ``trio_jobs_executor``: the executor the server runs (override it in your ``conftest.py``);
  the default, :func:`narrating_executor`, narrates ``payload["n"]`` events;
- ``trio_jobs_token``: the bearer token of the server and the client (default None);
- ``trio_jobs_app``: the job app (``trio_jobs.http.create_app``) over the two above;
- ``trio_jobs_server``: that app served by hypercorn on ``127.0.0.1`` port 0, in the test's
  ``nursery`` (pytest-trio); its value is the base URL ``http://127.0.0.1:<port>``;
- ``trio_jobs_client``: a :class:`~trio_jobs.JobClient` connected to it.

and the assertions :func:`assert_stream_done`, :func:`assert_stream_error` and
:func:`assert_stream_cancelled`, which check that a stream holds exactly one terminal signal,
as its last line, after well-formed events.

The fixtures are async (they need pytest-trio, with ``trio_mode = true`` or the ``trio``
marker). Where plugin autoloading is off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), load the
plugin with ``-p trio_jobs.testing``. Importing this module stays cheap (it is loaded in
every pytest run of a project that has trio-jobs installed): the HTTP stack is imported by
the fixtures that need it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import pytest
import trio

from ._narration import narrate
from ._registry import JobRegistry
from ._runner import Executor
from ._signals import Signal, TerminalSignal

if TYPE_CHECKING:
    from ._client import JobClient
    from ._models import NarrationEvent

__all__ = [
    "assert_stream_cancelled",
    "assert_stream_done",
    "assert_stream_error",
    "narrating_executor",
    "split_stream",
]


async def narrating_executor(job_id: str, payload: Any) -> None:
    """A small executor for tests: narrates ``n`` events (default 3), one per ``delay`` s.

    Payload keys (all optional): ``n`` (events), ``delay`` (seconds to sleep before each
    event, default 0), ``fail`` (after the events, raise ``RuntimeError(fail)``: the job
    ends with ``[ERROR] <fail>``).
    """
    data = payload if isinstance(payload, dict) else {}
    n = int(data.get("n", 3))
    delay = float(data.get("delay", 0.0))
    for i in range(1, n + 1):
        if delay:
            await trio.sleep(delay)
        narrate("step", f"step {i} of {n}", step=i, total=n)
    if data.get("fail"):
        raise RuntimeError(str(data["fail"]))
    await trio.lowlevel.checkpoint()


# -- assertions ----------------------------------------------------------------------------


def split_stream(
    lines: Iterable[str | NarrationEvent | TerminalSignal],
) -> tuple[list[dict[str, Any]], TerminalSignal]:
    """Check a stream's shape and split it into its events (as dicts) and its signal.

    The stream may open with ``[START]``; every other line but the last must be a JSON
    object (an event); the last line, and only it, must be a terminal signal.
    Items (:class:`~trio_jobs.NarrationEvent`, :class:`~trio_jobs.TerminalSignal`) are
    read through their wire form.

    Raises:
        AssertionError: the stream has no terminal signal, several, one that is not last,
            or a line that is neither an event nor a signal.
    """
    __tracebackhide__ = True
    wire = [line if isinstance(line, str) else line.wire for line in lines]
    if wire and wire[0] == Signal.START.value:
        wire = wire[1:]
    signals = [(i, s) for i, line in enumerate(wire) if (s := Signal.parse(line)) is not None]
    if not signals:
        last = wire[-1] if wire else "<empty stream>"
        raise AssertionError(f"stream has no terminal signal; last line: {last!r}")
    if len(signals) > 1:
        shown = [wire[i] for i, _ in signals]
        raise AssertionError(f"stream has {len(signals)} signals, expected exactly one: {shown}")
    index, signal = signals[0]
    if not signal.signal.is_terminal:
        raise AssertionError(f"stream ends without a terminal signal: {wire[index]!r}")
    if index != len(wire) - 1:
        raise AssertionError(
            f"terminal signal {wire[index]!r} is line {index + 1} of {len(wire)}, not the last"
        )
    events: list[dict[str, Any]] = []
    for line in wire[:-1]:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise AssertionError(f"not an event (a JSON object) nor a signal: {line!r}")
        events.append(event)
    return events, signal


def _assert_signal(
    lines: Iterable[str | NarrationEvent | TerminalSignal],
    expected: Signal,
    match: str | None = None,
) -> list[dict[str, Any]]:
    """Check the stream's shape, that it ended with ``expected`` and (for ``[ERROR]``) that
    its message matches ``match``; return its events."""
    __tracebackhide__ = True
    events, signal = split_stream(lines)
    if signal.signal is not expected:
        raise AssertionError(f"expected {expected.value}, stream ended with {signal.wire!r}")
    if match is not None and not re.search(match, signal.message or ""):
        raise AssertionError(f"error message {signal.message!r} does not match {match!r}")
    return events


def assert_stream_done(
    lines: Iterable[str | NarrationEvent | TerminalSignal],
) -> list[dict[str, Any]]:
    """Assert the stream ended with ``[DONE]`` (see :func:`split_stream`); return its events."""
    __tracebackhide__ = True
    return _assert_signal(lines, Signal.DONE)


def assert_stream_error(
    lines: Iterable[str | NarrationEvent | TerminalSignal], match: str | None = None
) -> list[dict[str, Any]]:
    """Assert the stream ended with ``[ERROR]``, its message matching the regex ``match``
    (``re.search``, as in ``pytest.raises``); return its events."""
    __tracebackhide__ = True
    return _assert_signal(lines, Signal.ERROR, match)


def assert_stream_cancelled(
    lines: Iterable[str | NarrationEvent | TerminalSignal],
) -> list[dict[str, Any]]:
    """Assert the stream ended with ``[CANCELLED]``; return its events."""
    __tracebackhide__ = True
    return _assert_signal(lines, Signal.CANCELLED)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def trio_jobs_registry() -> JobRegistry:
    """A fresh job registry (the server fixture serves this one)."""
    return JobRegistry()


@pytest.fixture
def trio_jobs_executor() -> Executor:
    """The executor the test server runs; override this fixture to run your own."""
    return narrating_executor


@pytest.fixture
def trio_jobs_token() -> str | None:
    """The bearer token of the test server and client; None means no auth."""
    return None


@pytest.fixture
def trio_jobs_app(
    trio_jobs_registry: JobRegistry, trio_jobs_executor: Executor, trio_jobs_token: str | None
) -> Any:
    """The job app (``trio_jobs.http.create_app``) over the registry and executor fixtures."""
    from .http import create_app

    return create_app(trio_jobs_registry, trio_jobs_executor, token=trio_jobs_token)


@pytest.fixture
async def trio_jobs_server(nursery: trio.Nursery, trio_jobs_app: Any) -> str:
    """The app served on ``127.0.0.1`` port 0 until the test ends; its base URL."""
    from .http import serve

    url: str = await nursery.start(serve, trio_jobs_app)
    return url


@pytest.fixture
async def trio_jobs_client(
    trio_jobs_server: str, trio_jobs_token: str | None
) -> AsyncIterator[JobClient]:
    """A :class:`~trio_jobs.JobClient` of the test server (with the token fixture's token)."""
    from ._client import JobClient

    async with JobClient(trio_jobs_server, token=trio_jobs_token) as client:
        yield client
