"""Persistence: the writer (group commits, reserved event ids, poison isolation), restart
recovery, shared mode, and the task that runs them."""

from .._job import INTERRUPTED as INTERRUPTED
from ._recovery import recover as recover
from ._shared import SharedRunner as SharedRunner
from ._task import StoreBacking as StoreBacking
from ._task import persister_of as persister_of
from ._task import run_persistence as run_persistence
from ._writer import Persister as Persister
from ._writer import StoreHealth as StoreHealth

__all__ = [
    "INTERRUPTED",
    "Persister",
    "SharedRunner",
    "StoreBacking",
    "StoreHealth",
    "open_registry",
    "persister_of",
    "recover",
    "run_persistence",
    "run_shared_jobs",
]


def __getattr__(name: str) -> object:
    # open_registry and run_shared_jobs live a floor up (in _run); kept importable here.
    if name in ("open_registry", "run_shared_jobs"):
        from .. import _run

        return getattr(_run, name)
    raise AttributeError(name)
