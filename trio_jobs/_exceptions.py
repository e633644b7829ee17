"""The trio-jobs exception tree.

Every error the toolkit raises on purpose derives from one root::

    TrioJobsError
    ├── JobNotFound              no job with that id (never existed, or retention dropped it)
    ├── InvalidJobState          the operation does not apply to the job's current state
    ├── JobFailed                a job ended with ``[ERROR] <message>``
    │   └── JobTimeout           ... because its timeout fired
    ├── JobCancelled             a job ended with ``[CANCELLED]``
    ├── StreamEndedWithoutSignal a stream closed before its terminal signal
    ├── StoreUnavailable         the job store did not take a write (a submission is not
    │                            acknowledged)
    └── TransportError           the job server could not be reached or answered badly
        └── HTTPStatusError      the server answered with an error status and JSON body
"""

from __future__ import annotations

__all__ = [
    "HTTPStatusError",
    "InvalidJobState",
    "JobCancelled",
    "JobFailed",
    "JobNotFound",
    "JobTimeout",
    "StoreUnavailable",
    "StreamEndedWithoutSignal",
    "TransportError",
    "TrioJobsError",
]


class TrioJobsError(Exception):
    """Root of every exception trio-jobs raises on purpose."""


class JobNotFound(TrioJobsError, LookupError):
    """No job with this id is known (never created, or dropped after retention)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"unknown job: {job_id}")
        self.job_id = job_id


class InvalidJobState(TrioJobsError):
    """The operation does not apply to the job in its current state."""


class JobFailed(TrioJobsError):
    """The job ended with ``[ERROR] <message>``; ``message`` holds that text."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id


class JobTimeout(JobFailed):
    """The job failed because its timeout fired."""


class JobCancelled(TrioJobsError):
    """The job ended with ``[CANCELLED]``."""

    def __init__(self, job_id: str | None = None) -> None:
        super().__init__(f"job cancelled: {job_id}" if job_id else "job cancelled")
        self.job_id = job_id


class StreamEndedWithoutSignal(TrioJobsError):
    """A job stream ended before its terminal signal: never a silent success."""


class StoreUnavailable(TrioJobsError):
    """The job store could not be reached or did not commit in time; what was asked of
    it (a durable submission) did not happen."""


class TransportError(TrioJobsError):
    """The job server could not be reached, or the connection broke."""


class HTTPStatusError(TransportError):
    """The job server answered with an error status.

    ``status_code``, ``error`` and ``detail`` come from the server's JSON error body.
    """

    def __init__(self, status_code: int, error: str, detail: object = None) -> None:
        super().__init__(f"HTTP {status_code}: {error}" + (f" ({detail})" if detail else ""))
        self.status_code = status_code
        self.error = error
        self.detail = detail
