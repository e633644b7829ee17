"""Sessions: tests, lint, typing, bench, demo (and tests_store for each job store)."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys

import nox

nox.options.sessions = ["tests", "lint", "typing"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

#: Every session's venv is made from the interpreter nox runs on (whatever python3 started
#: it), so no session looks for a pinned version that is missing: nox would only say
#: "skipped" and exit 0. An older Python stops here, loudly.
PYTHON = sys.executable
if sys.version_info < (3, 11):  # noqa: UP036 (nox may run on any Python)
    sys.exit(
        f"trio-jobs needs Python 3.11 or newer; nox runs on Python "
        f"{platform.python_version()} ({sys.executable}). Make the venv with a newer one: "
        "python3.11 -m venv .venv && .venv/bin/pip install nox && .venv/bin/nox -s tests"
    )


def _have_postgres_server() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _apt_install(session: nox.Session, package: str) -> None:
    """``apt-get install package`` when we may (root and apt-get); nothing otherwise."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-qq", external=True, env=env)
    session.run(
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        package,
        external=True,
        env=env,
    )


def _ensure_postgres(session: nox.Session) -> None:
    """Install Debian's PostgreSQL server when it is missing and we may (root + apt-get).

    The tests start and stop a throw-away cluster themselves (tests/pg.py); without a
    server they skip with a message, except in CI, where a missing server is an error.
    """
    if os.environ.get("TRIO_JOBS_PG_DSN") or _have_postgres_server():
        return
    _apt_install(session, "postgresql")
    if not _have_postgres_server() and os.environ.get("CI"):
        session.error("CI needs a PostgreSQL server for the PostgreSQL tests")


def _have_chromium() -> bool:
    names = (os.environ.get("TRIO_JOBS_CHROMIUM") or "chromium", "chromium-browser")
    return any(shutil.which(name) for name in names)


def _ensure_chromium(session: nox.Session) -> None:
    """Install Debian's Chromium when it is missing and we may (root + apt-get).

    The browser tests (tests/test_http_browser.py) drive it headless; without it they
    skip with a message, except in CI, where a missing browser is an error.
    """
    if _have_chromium():
        return
    _apt_install(session, "chromium")
    if not _have_chromium() and os.environ.get("CI"):
        session.error("CI needs Chromium for the browser tests")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite; installs PostgreSQL and Chromium (apt-get) when it can, for
    its tests."""
    _ensure_postgres(session)
    _ensure_chromium(session)
    session.install("-e", ".[test,postgres]")
    env = {"TRIO_JOBS_REQUIRE_PG": "1"} if os.environ.get("CI") else {}
    session.run("pytest", *session.posargs, env=env)


@nox.session(python=PYTHON)
@nox.parametrize("store", ["memory", "sqlite", "postgres"])
def tests_store(session: nox.Session, store: str) -> None:
    """The store-parametrised lifecycle suite against one job store."""
    if store == "postgres":
        _ensure_postgres(session)
    session.install("-e", ".[test,postgres]")
    session.run(
        "pytest",
        "tests/test_lifecycle.py",
        "tests/test_property.py",
        "tests/test_store.py",
        *session.posargs,
        env={"TRIO_JOBS_TEST_STORE": store},
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff==0.17.6")
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
