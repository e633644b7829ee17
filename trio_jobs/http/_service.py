"""JobService: what the job routes of one app share (registry, options, metrics, streams).

It also owns the two stream-lifecycle rules of the HTTP layer:

* ``on_disconnect``: a job created with ``"cancel"`` is cancelled when its last streaming
  client goes away before the terminal signal (a stream the server itself ended, on
  shutdown, does not count as going away).
* draining: :meth:`begin_drain` (called by :func:`trio_jobs.http.serve` on shutdown) gives
  every open stream a deadline; a stream whose job ends before it gets its terminal signal,
  the others get whatever events are ready and then a clean end of body.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import trio

from .._exceptions import JobNotFound, StoreUnavailable
from .._job import Job
from .._models import JobRecord, JobState, Transition
from .._persist import persister_of
from .._registry import JobRegistry
from .._run import run_jobs
from .._runner import Executor
from ._errors import ApiError, logger
from ._metrics import ServerMetrics

__all__ = ["JobService", "PayloadParser", "is_loopback", "not_found"]

PayloadParser = Callable[[dict[str, Any]], Any]
"""``parse_payload(body_without_options) -> payload``; raises pydantic ``ValidationError``
or ``ValueError`` for a bad operation (answered 422)."""


@lru_cache(maxsize=256)
def is_loopback(host: str | None) -> bool:
    """True for loopback addresses and ``localhost`` (and for an unknown host: None).
    Cached: every request asks it of its server's address and its ``Host``."""
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def not_found(job_id: str) -> ApiError:
    return ApiError(404, "not found", f"unknown job: {job_id}")


class JobService:
    """Shared state of the job routes of one app; see the module docstring."""

    def __init__(
        self,
        registry: JobRegistry,
        executor: Executor | None,
        *,
        name: str = "trio-jobs",
        parse_payload: PayloadParser | None = None,
        token: str | None = None,
        max_body_bytes: int = 1 << 20,
        keepalive_s: float = 15.0,
        max_concurrent: int | None = None,
        require_token_off_loopback: bool = True,
        retry_ms: int = 2000,
        batch_limit: int = 2048,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        if not keepalive_s > 0:
            raise ValueError("keepalive_s must be > 0")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1 or None")
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        self.registry = registry
        self.executor = executor
        self.name = name
        self.parse_payload = parse_payload
        self.token = token
        self._token_bytes = token.encode() if token is not None else b""
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.max_concurrent = max_concurrent
        self.require_token_off_loopback = require_token_off_loopback
        self.retry_ms = retry_ms
        self.batch_limit = batch_limit
        self.metrics = ServerMetrics(registry)
        self.draining = False
        self.cancel_settle_s = 1.0
        """How long DELETE waits for a cancelled job to settle before answering."""
        self.public_paths: set[str] = {"/health"}
        """Paths answered to ``GET``/``HEAD`` without a token: ``/health`` and whatever
        holds no data (the dashboard's static page, see ``servers._ui``)."""
        self.fast_paths = False
        """True while the app serves: the job routes may then skip Quart's
        request machinery when nothing else would run (see ``_asgi``)."""
        self.drain_deadline = math.inf
        self._cancel_on_disconnect: set[str] = set()
        self._watchers: dict[str, int] = {}
        self._waits: set[trio.CancelScope] = set()
        self._runner_scope: trio.CancelScope | None = None
        registry.add_observer(self._on_transition)

    # ---- auth ----------------------------------------------------------------------

    def check_auth(self, authorization: str | None, server_host: str | None) -> None:
        """Raise a 401 ``ApiError`` unless the request may pass."""
        if self.token is None:
            if self.require_token_off_loopback and not is_loopback(server_host):
                raise ApiError(
                    401,
                    "unauthorized",
                    "this server listens on a non-loopback address and has no token "
                    "configured; it refuses every request",
                )
            return
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode("utf-8", "surrogateescape"), self._token_bytes
        ):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong bearer token" if authorization else "a bearer token is required",
                headers={"WWW-Authenticate": f'Bearer realm="{self.name}"'},
            )

    # ---- per-job answers, shared by the routes and the ASGI fast path ------------------

    async def known(self, job_id: str) -> None:
        """Make a job that is not in memory known from the registry's store (dropped by
        retention, or another node's in shared mode), so every per-job route can answer
        for it. A store that cannot be read is answered 503."""
        if job_id in self.registry:
            return
        try:
            await self.registry.load(job_id)
        except Exception as exc:
            logger.exception("looking up job %s in the store failed", job_id)
            raise ApiError(503, "store unavailable", str(exc) or type(exc).__name__) from None

    async def record(self, job_id: str) -> dict[str, Any]:
        """The job's record as JSON data (404 for an unknown job)."""
        return (await self._get(job_id)).to_dict()

    async def _get(self, job_id: str) -> JobRecord:
        await self.known(job_id)
        try:
            return self.registry.get(job_id)
        except JobNotFound:
            raise not_found(job_id) from None

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """``DELETE /v1/jobs/{id}``: cancel the job and answer its record.

        The record is the settled one when the job ends within ``cancel_settle_s`` (it
        normally does within a scheduler tick); a job shielding itself is reported as it
        stands. 409 when the job had already ended, was already being cancelled, or
        (another node running it) ended otherwise before the cancel reached it.
        """
        state = (await self._get(job_id)).state
        registry = self.registry
        if registry.cancel_job(job_id, "cancelled over HTTP"):
            with trio.move_on_after(self.cancel_settle_s):
                settled = await registry.wait(job_id)
                if settled.state is not JobState.CANCELLED:
                    raise ApiError(
                        409, "conflict", f"the job {settled.state.value} before the cancel"
                    )
                return settled.to_dict()
            return registry.get(job_id).to_dict()
        if state.is_terminal:
            raise ApiError(409, "conflict", f"the job is already {state.value}")
        raise ApiError(409, "conflict", "the job is already being cancelled")

    # ---- submitting and health ----------------------------------------------------------

    def store_health(self) -> dict[str, Any] | None:
        """The store's health while the registry is persisted (None without a store)."""
        persister = persister_of(self.registry)
        return None if persister is None else persister.health.to_dict()

    @property
    def durable(self) -> bool:
        """Whether a submission waits for its store (the registry is persisted)."""
        return self.registry.backing is not None

    def create(self, payload: Any, options: dict[str, Any]) -> str:
        """:meth:`submit` for a registry that is not persisted: nothing to wait for, so
        synchronous. 422 for an option out of range."""
        try:
            job_id = self.registry.create_job(payload, **options)
        except ValueError as exc:
            detail = [{"loc": [], "msg": str(exc), "type": "value_error"}]
            raise ApiError(422, "invalid request", detail) from None
        self.metrics.submitted.inc()
        return job_id

    async def submit(self, payload: Any, options: dict[str, Any]) -> str:
        """``POST /v1/jobs``: create the job and answer once it is stored (with a store,
        the 201 is a promise the job survives a crash). 503 when the store cannot take it,
        422 for an option out of range."""
        try:
            job_id = await self.registry.submit(payload, **options)
        except StoreUnavailable as exc:
            raise ApiError(
                503, "store unavailable", str(exc), headers={"Retry-After": "1"}
            ) from None
        except ValueError as exc:
            detail = [{"loc": [], "msg": str(exc), "type": "value_error"}]
            raise ApiError(422, "invalid request", detail) from None
        self.metrics.submitted.inc()
        return job_id

    def health(self) -> tuple[int, dict[str, Any]]:
        """``GET /health``: 200 while the server can take jobs; 503 (saying why) while
        its store is unreachable."""
        registry = self.registry
        counts = registry.counts()
        store = self.store_health()
        status = "draining" if self.draining else "ok"
        if store is not None and not store["ok"]:
            status = "store unavailable"
        body: dict[str, Any] = {
            "status": status,
            "name": self.name,
            "jobs": len(registry),
            "running": registry.running,
            "queued": counts[JobState.QUEUED],
            "open_streams": sum(self._watchers.values()),
        }
        if store is not None:
            body["store"] = store
        return (503 if status == "store unavailable" else 200), body

    # ---- runner ----------------------------------------------------------------------

    async def run_runner(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``run_jobs`` until :meth:`stop_runner` (used from ``before_serving``)."""
        if self.executor is None or self._runner_scope is not None:
            task_status.started()
            return
        with trio.CancelScope() as scope:
            self._runner_scope = scope
            try:
                await run_jobs(
                    self.registry,
                    self.executor,
                    max_concurrent=self.max_concurrent,
                    task_status=task_status,
                )
            finally:
                self._runner_scope = None

    def stop_runner(self) -> None:
        """Cancel the runner: running jobs end ``[CANCELLED]``, queued jobs stay queued."""
        if self._runner_scope is not None:
            self._runner_scope.cancel()

    # ---- streams -------------------------------------------------------------------

    def mark_cancel_on_disconnect(self, job_id: str) -> None:
        self._cancel_on_disconnect.add(job_id)

    def stream_opened(self, job_id: str) -> None:
        self._watchers[job_id] = self._watchers.get(job_id, 0) + 1

    def stream_closed(self, job_id: str, *, abandoned: bool) -> None:
        """A stream of ``job_id`` ended; ``abandoned``: the client left before the signal."""
        left = self._watchers.get(job_id, 1) - 1
        if left > 0:
            self._watchers[job_id] = left
            return
        self._watchers.pop(job_id, None)
        if abandoned and job_id in self._cancel_on_disconnect:
            self.registry.cancel_job(job_id, "the last streaming client disconnected")

    def watchers(self, job_id: str) -> int:
        """Number of streams of ``job_id`` open right now."""
        return self._watchers.get(job_id, 0)

    def _on_transition(self, job: Job, transition: Transition) -> None:
        if transition.state.is_terminal:
            self._cancel_on_disconnect.discard(job.id)

    async def wait_ready(self, stream: Any, deadline: float) -> bool:
        """Wait until ``stream`` has an item, the deadline passes or the drain ends.

        Returns True when the stream is ready. Cancellation (client gone) propagates.
        """
        with trio.CancelScope(deadline=min(deadline, self.drain_deadline)) as scope:
            self._waits.add(scope)
            try:
                await stream.wait_ready()
            finally:
                self._waits.discard(scope)
        return not scope.cancelled_caught

    def drain_expired(self) -> bool:
        return self.draining and trio.current_time() >= self.drain_deadline

    def begin_drain(self, grace_s: float) -> None:
        """Shutdown: every open stream ends within ``grace_s`` seconds (see module doc)."""
        deadline = trio.current_time() + max(0.0, grace_s)
        if self.draining and deadline >= self.drain_deadline:
            return
        self.draining = True
        self.drain_deadline = deadline
        for scope in self._waits:
            if scope.deadline > deadline:
                scope.deadline = deadline
