"""The public API: __all__ is sorted, complete and importable; implementation stays private."""

from __future__ import annotations

import inspect
import types

import trio_jobs


def test_all_is_sorted_and_complete() -> None:
    names = trio_jobs.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))
    public = {
        name
        for name in dir(trio_jobs)  # dir(): the client's names are loaded lazily (PEP 562)
        if not name.startswith("_") and not isinstance(getattr(trio_jobs, name), types.ModuleType)
    }
    assert public == set(names)


def test_every_public_name_is_re_exported_from_a_private_module() -> None:
    for name in trio_jobs.__all__:
        value = getattr(trio_jobs, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue  # constants and type aliases
        assert value.__module__.startswith("trio_jobs."), (name, value.__module__)


def test_the_core_does_not_import_the_http_stack() -> None:
    import subprocess
    import sys

    code = (
        "import sys, trio_jobs\n"
        "bad = [m for m in ('quart', 'quart_trio', 'hypercorn', 'servers') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_trio_jobs_does_not_import_httpx() -> None:
    """The client's names load on first use; until then neither httpx nor trio-websocket."""
    import subprocess
    import sys

    code = (
        "import sys, trio_jobs\n"
        "assert 'JobClient' in dir(trio_jobs)\n"
        "print(','.join(m for m in ('httpx', 'trio_websocket') if m in sys.modules))\n"
        "from trio_jobs import JobClient, raise_for_signal\n"
        "from trio_jobs._client import JobClient as Private\n"
        "assert JobClient is Private is trio_jobs.JobClient and callable(raise_for_signal)\n"
        "assert 'JobClient' in vars(trio_jobs)\n"
        "try:\n"
        "    trio_jobs.NoSuchName\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('a missing name must raise AttributeError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
