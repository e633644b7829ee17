"""Every program in ``examples/`` runs to completion as a subprocess (exit 0, expected lines).

Examples that need a PostgreSQL server get one from tests/pg.py (skipped without one).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from servers.worker import tiny_tokens
from tests import pg

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED: dict[str, list[str]] = {
    "basic_job.py": ["[DONE]", "[ERROR] Job timed out after 0.2s", "[CANCELLED]"],
    "http_job.py": ["[DONE]", "Hello, worker!", "ended completed"],
    "openai_worker.py": [
        "".join(tiny_tokens("tiny", "Tell me about trio", max_tokens=16)),
        "[DONE]",
    ],
    "shared_queens.py": [
        "b | [CANCELLED]",
        "a says: cancelled",
        "the hive ran 10 jobs: each ran exactly once",
        "[ERROR] interrupted",
        "taken over by the surviving queen",
    ],
}
NEEDS_POSTGRES = {"shared_queens.py"}
"""Examples run with a PostgreSQL DSN as their argument."""


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_example_runs(name: str) -> None:
    argv = [sys.executable, str(EXAMPLES / name)]
    if name in NEEDS_POSTGRES:
        argv.append(pg.dsn_or_skip())
    with trio.fail_after(30):
        result = await trio.run_process(
            argv,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    for expected in EXPECTED[name]:
        assert expected in out, (expected, out[-2000:])
