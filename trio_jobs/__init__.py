"""trio-jobs: run jobs under structured concurrency and stream their progress.

Every job runs in its own nursery under its own cancel scope; code inside a job calls
:func:`narrate`; every subscriber of the job sees its events and then exactly one terminal
signal (``[DONE]``, ``[ERROR] <message>`` or ``[CANCELLED]``), produced by the toolkit when
the job's narration channel closes.

The client's names (:class:`JobClient`, its streams, :func:`raise_for_signal`) are loaded on
first use (PEP 562), so that ``import trio_jobs`` does not import httpx.

Floors, bottom up; a module imports only from its own floor or below (``tests/test_layers.py``
keeps it so, and keeps the lifecycle floors free of httpx, quart, hypercorn, trio-websocket,
``servers``, the client, persistence and the stores):

0. values and errors: ``_exceptions``, ``_models``, ``_signals``, ``_json``, ``_receive``
1. channel and narration: ``_channel``, ``_narration``
2. the job's state machine: ``_job``
3. the registry: ``_registry`` (its store is reached through one typed ``backing`` slot)
4. running: ``_runner``, ``_stream``
5. stores: ``_stores/``
6. persistence: ``_persist/`` (writer, recovery, shared mode)
7. composition: ``_run`` (``run_jobs``, ``open_registry``, ``run_shared_jobs``)
8. the HTTP layer, the client and the pytest plugin: ``http/``, ``_client/``, ``testing``
"""

import typing as _typing

from ._channel import JobStream as JobStream
from ._channel import StreamItem as StreamItem
from ._exceptions import HTTPStatusError as HTTPStatusError
from ._exceptions import InvalidJobState as InvalidJobState
from ._exceptions import JobCancelled as JobCancelled
from ._exceptions import JobFailed as JobFailed
from ._exceptions import JobNotFound as JobNotFound
from ._exceptions import JobTimeout as JobTimeout
from ._exceptions import StoreUnavailable as StoreUnavailable
from ._exceptions import StreamEndedWithoutSignal as StreamEndedWithoutSignal
from ._exceptions import TransportError as TransportError
from ._exceptions import TrioJobsError as TrioJobsError
from ._models import JobPage as JobPage
from ._models import JobQuery as JobQuery
from ._models import JobRecord as JobRecord
from ._models import JobState as JobState
from ._models import NarrationEvent as NarrationEvent
from ._models import Priority as Priority
from ._models import RetryPolicy as RetryPolicy
from ._models import Transition as Transition
from ._narration import current_job_id as current_job_id
from ._narration import job_nursery as job_nursery
from ._narration import narrate as narrate
from ._persist import SharedRunner as SharedRunner
from ._persist import run_persistence as run_persistence
from ._registry import JobRegistry as JobRegistry
from ._run import open_job_runner as open_job_runner
from ._run import open_registry as open_registry
from ._run import run_jobs as run_jobs
from ._run import run_shared_jobs as run_shared_jobs
from ._runner import Executor as Executor
from ._runner import run_job as run_job
from ._signals import Signal as Signal
from ._signals import TerminalSignal as TerminalSignal
from ._signals import timeout_message as timeout_message
from ._stores import JobStore as JobStore
from ._stores import MemoryStore as MemoryStore
from ._stores import PostgresStore as PostgresStore
from ._stores import SharedStore as SharedStore
from ._stores import SQLiteStore as SQLiteStore
from ._stores import StoredJob as StoredJob
from ._stream import WireLines as WireLines
from ._stream import execute_and_stream as execute_and_stream

if _typing.TYPE_CHECKING:
    from ._client import JobClient as JobClient
    from ._client import JobEventStream as JobEventStream
    from ._client import JobWebSocketStream as JobWebSocketStream
    from ._client import raise_for_signal as raise_for_signal

_LAZY = frozenset({"JobClient", "JobEventStream", "JobWebSocketStream", "raise_for_signal"})


def __getattr__(name: str) -> object:
    """A client name, imported (with httpx) the first time it is asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import _client

    value: object = getattr(_client, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


DONE = Signal.DONE.value
ERROR = Signal.ERROR.value
CANCELLED = Signal.CANCELLED.value
START = Signal.START.value

__all__ = [
    "CANCELLED",
    "DONE",
    "ERROR",
    "START",
    "Executor",
    "HTTPStatusError",
    "InvalidJobState",
    "JobCancelled",
    "JobClient",
    "JobEventStream",
    "JobFailed",
    "JobNotFound",
    "JobPage",
    "JobQuery",
    "JobRecord",
    "JobRegistry",
    "JobState",
    "JobStore",
    "JobStream",
    "JobTimeout",
    "JobWebSocketStream",
    "MemoryStore",
    "NarrationEvent",
    "PostgresStore",
    "Priority",
    "RetryPolicy",
    "SQLiteStore",
    "SharedRunner",
    "SharedStore",
    "Signal",
    "StoreUnavailable",
    "StoredJob",
    "StreamEndedWithoutSignal",
    "StreamItem",
    "TerminalSignal",
    "Transition",
    "TransportError",
    "TrioJobsError",
    "WireLines",
    "current_job_id",
    "execute_and_stream",
    "job_nursery",
    "narrate",
    "open_job_runner",
    "open_registry",
    "raise_for_signal",
    "run_job",
    "run_jobs",
    "run_persistence",
    "run_shared_jobs",
    "timeout_message",
]

__version__ = "0.1.0"
