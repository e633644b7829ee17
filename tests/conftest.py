"""Suite-wide setup: with TRIO_JOBS_TEST_STORE=memory|sqlite|postgres, every JobRegistry that
the store-agnostic lifecycle tests make is persisted to a store of that kind (the nox
``tests_store`` sessions). test_store.py picks its store from the same variable itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import pg

_STORE_AGNOSTIC = ("tests.test_lifecycle", "tests.test_property")


@pytest.fixture(autouse=True)
def _store_under_test(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if request.node.module.__name__ in _STORE_AGNOSTIC:
        pg.persist_every_registry(os.environ.get("TRIO_JOBS_TEST_STORE"), monkeypatch, tmp_path)
