"""The ``trio_jobs.testing`` pytest plugin: its assertions, and its fixtures as a user sees them.

The fixture tests write a small downstream suite with ``pytester`` and run it in-process
(the plugin is loaded through its ``pytest11`` entry point, as in a user's project), with
``filterwarnings = error`` so that a leaked socket or generator would fail it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from trio_jobs import NarrationEvent, Signal, TerminalSignal
from trio_jobs.testing import (
    assert_stream_cancelled,
    assert_stream_done,
    assert_stream_error,
    split_stream,
)

pytest_plugins = ["pytester"]

EVENT = '{"id":1,"job_id":"job-1","action":"step","human":"one"}'


# -- assertions ------------------------------------------------------------------------------


def test_assert_stream_done_returns_the_events() -> None:
    assert assert_stream_done([EVENT, "[DONE]"]) == [
        {"id": 1, "job_id": "job-1", "action": "step", "human": "one"}
    ]
    assert assert_stream_done(["[START]", "[DONE]"]) == []
    event = NarrationEvent(1, "job-1", 0.0, "a", "step", "one")
    assert assert_stream_done([event, TerminalSignal(Signal.DONE, None, 2)])[0]["id"] == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "no terminal signal; last line: '<empty stream>'"),
        ([EVENT], "no terminal signal; last line: '" + EVENT),
        ([EVENT, "[DONE]", "[DONE]"], "2 signals, expected exactly one"),
        (["[DONE]", EVENT], "'[DONE]' is line 1 of 2, not the last"),
        ([EVENT, "[START]"], "ends without a terminal signal: '[START]'"),
        (["hello", "[DONE]"], "not an event (a JSON object) nor a signal: 'hello'"),
        (["[1, 2]", "[DONE]"], "not an event (a JSON object) nor a signal"),
    ],
)
def test_split_stream_rejects_bad_streams(lines: list[str], message: str) -> None:
    with pytest.raises(AssertionError) as info:
        split_stream(lines)
    assert message in str(info.value)


def test_outcome_assertions() -> None:
    assert_stream_error([EVENT, "[ERROR] disk full"], match="disk")
    assert_stream_error(["[ERROR] x"])
    assert_stream_cancelled(["[CANCELLED]"])
    with pytest.raises(
        AssertionError, match="expected \\[DONE\\], stream ended with '\\[ERROR\\] x'"
    ):
        assert_stream_done(["[ERROR] x"])
    with pytest.raises(AssertionError, match="does not match 'quota'"):
        assert_stream_error(["[ERROR] disk full"], match="quota")
    with pytest.raises(AssertionError, match="expected \\[ERROR\\]"):
        assert_stream_error(["[CANCELLED]"])
    with pytest.raises(AssertionError) as cancelled:
        assert_stream_cancelled([EVENT, "[DONE]"])
    assert str(cancelled.value) == "expected [CANCELLED], stream ended with '[DONE]'"
    with pytest.raises(AssertionError) as shape:  # the shape is checked before the signal
        assert_stream_error(["[DONE]", EVENT], match="x")
    assert "not the last" in str(shape.value)


def test_importing_the_plugin_stays_cheap() -> None:
    """Loaded in every pytest run: it must not pull in the HTTP server stack."""
    code = (
        "import sys, trio_jobs.testing; "
        "print(sorted(m for m in ('quart', 'quart_trio', 'hypercorn', 'trio_websocket') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# -- fixtures, from a user's suite -------------------------------------------------------------

INI = """
[pytest]
trio_mode = true
filterwarnings =
    error
    ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning
addopts = -p no:cacheprovider
"""

USER_TESTS = """
import pytest
import trio

from trio_jobs import JobCancelled, JobFailed, JobRegistry
from trio_jobs.testing import assert_stream_cancelled, assert_stream_done


async def test_default_executor(trio_jobs_client, trio_jobs_registry):
    lines = []
    job_id = await trio_jobs_client.submit_and_stream({"n": 4}, lines.append)
    events = assert_stream_done(lines)
    assert [e["human"] for e in events] == [f"step {i} of 4" for i in range(1, 5)]
    assert isinstance(trio_jobs_registry, JobRegistry)
    assert trio_jobs_registry.get(job_id).state.value == "completed"


async def test_failure_and_cancel(trio_jobs_client):
    with pytest.raises(JobFailed, match="nope"):
        await trio_jobs_client.submit_and_stream({"n": 1, "fail": "nope"}, print)
    job_id = await trio_jobs_client.submit({"n": 1, "delay": 60})
    async with trio_jobs_client.stream(job_id) as events:
        await trio_jobs_client.cancel(job_id)
        assert_stream_cancelled([item async for item in events])


async def test_server_url(trio_jobs_server):
    assert trio_jobs_server.startswith("http://127.0.0.1:")
"""

CONFTEST_OVERRIDES = """
import pytest
from trio_jobs import narrate


@pytest.fixture
def trio_jobs_executor():
    async def greet(job_id, payload):
        narrate("greet", f"hello {payload['name']}")

    return greet


@pytest.fixture
def trio_jobs_token():
    return "t0ken"
"""

OVERRIDE_TESTS = """
import pytest
from trio_jobs import HTTPStatusError
from trio_jobs._client import JobClient as Client
from trio_jobs.testing import assert_stream_done


async def test_custom_executor_and_token(trio_jobs_client, trio_jobs_server):
    lines = []
    await trio_jobs_client.submit_and_stream({"name": "ada"}, lines.append)
    assert [e["human"] for e in assert_stream_done(lines)] == ["hello ada"]
    async with Client(trio_jobs_server) as anonymous:
        with pytest.raises(HTTPStatusError) as info:
            await anonymous.submit({"name": "x"})
    assert info.value.status_code == 401
"""


def test_fixtures_in_a_user_suite(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_inprocess("-q")
    result.assert_outcomes(passed=3)


def test_fixtures_can_be_overridden(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST_OVERRIDES)
    pytester.makepyfile(test_override=OVERRIDE_TESTS)
    result = pytester.runpytest_inprocess("-q")
    result.assert_outcomes(passed=1)


def test_a_failing_stream_assertion_reads_well(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_fails="""
        from trio_jobs.testing import assert_stream_done

        async def test_it(trio_jobs_client):
            lines = []
            await trio_jobs_client.submit_and_stream({"n": 1}, lines.append)
            assert_stream_done(lines + ["[DONE]"])
        """
    )
    result = pytester.runpytest_inprocess("-q")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: stream has 2 signals, expected exactly one*"])


def test_loading_the_plugin_by_name(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without entry-point autoloading, ``-p trio_jobs.testing`` gives the same fixtures."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makeini(INI)
    pytester.makepyfile(
        test_named="""
        from trio_jobs.testing import assert_stream_done

        async def test_it(trio_jobs_client):
            lines = []
            await trio_jobs_client.submit_and_stream({"n": 2}, lines.append)
            assert len(assert_stream_done(lines)) == 2
        """
    )
    result = pytester.runpytest_subprocess("-p", "pytest_trio.plugin", "-p", "trio_jobs.testing")
    result.assert_outcomes(passed=1)
