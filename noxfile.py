"""Sessions: tests, lint, typing, bench, demo (and tests_store for each job store)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typing"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, with the PostgreSQL tests when TRIO_JOBS_PG_DSN is set."""
    session.install("-e", ".[test,postgres]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
@nox.parametrize("store", ["memory", "sqlite", "postgres"])
def tests_store(session: nox.Session, store: str) -> None:
    """The lifecycle suite against one job store."""
    session.install("-e", ".[test,postgres]")
    session.run("pytest", "tests/test_lifecycle.py", *session.posargs,
                env={"TRIO_JOBS_TEST_STORE": store})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typing(session: nox.Session) -> None:
    """mypy --strict on the library and the daemons."""
    session.install("-e", ".[test,postgres,dev]")
    session.run("mypy", "--strict", "trio_jobs", "servers")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: figures and ratios to baselines measured in the same run."""
    session.install("-e", ".[bench,postgres]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Queen + hive + worker on loopback; one job submitted and streamed to [DONE]."""
    session.install("-e", ".")
    session.run("python", "-m", "servers.demo", *session.posargs)
