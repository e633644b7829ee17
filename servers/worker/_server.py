"""The worker daemon: serves ``infer`` jobs, streams tokens as narration, heartbeats the queen."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from pydantic import ValidationError

from trio_jobs import JobRegistry, JobState, narrate
from trio_jobs.http import create_app, job_service

from .._daemon import run_daemon
from .._openai_wire import (
    DONE_FRAME,
    chat_chunk,
    render_messages,
    sse_frame,
    usage_object,
)
from ..operations import Infer, parse_operation, wrong_operation
from ._backends import Backend, OpenAIBackend, TinyBackend, UpstreamError
from ._tiny import tiny_tokens

__all__ = ["WorkerConfig", "make_backend", "make_registry", "build_app", "serve_worker"]

logger = logging.getLogger("servers.worker")


@dataclass
class WorkerConfig:
    """How one worker runs; the hive fills it from ``worker_spawn``."""

    worker_id: str = field(default_factory=lambda: f"worker-{os.getpid()}")
    model: str = "tiny"
    hive_id: str | None = None
    queen_url: str | None = None
    backend: str = "tiny"
    upstream_url: str | None = None
    upstream_model: str | None = None
    token_delay_s: float = 0.0
    heartbeat_s: float = 1.0
    parent_pid: int | None = None
    token: str | None = None
    max_concurrent: int | None = 4
    """Jobs run at once (more wait in its queue); heartbeats advertise it as ``capacity``,
    and the queen schedules no more than that on it."""
    stop_grace_s: float = 2.0
    """On SIGTERM, how long jobs in flight may go on before they end
    ``[ERROR] worker shutting down`` (the hive passes half its SIGKILL grace)."""


MAX_BODY_BYTES = 16 << 20
"""The worker's ``POST /v1/jobs`` body limit. Above the queen's 1 MiB: the ``infer`` body
the queen forwards carries a chat twice (``messages`` and the rendered ``prompt``), JSON
escaped, so a request at the queen's limit must still fit here."""

KEEPALIVE_S = 5.0
"""Seconds of quiet after which a worker's job stream gets a keep-alive comment (the queen's
``stream_silence_s`` must be longer)."""


class WorkerStopping(Exception):
    """The worker was stopped (SIGTERM) while this job ran; it ends ``[ERROR]``."""


def make_registry() -> JobRegistry:
    """The worker's job registry (one place, so a job store can be passed in later)."""
    return JobRegistry(actor="worker", retention=300.0)


def make_backend(config: WorkerConfig) -> Backend:
    """The token source chosen by ``--backend``."""
    if config.backend == "openai":
        if not config.upstream_url:
            raise ValueError("--backend openai needs --upstream-url")
        return OpenAIBackend(config.upstream_url, upstream_model=config.upstream_model)
    if config.backend == "tiny":
        return TinyBackend(token_delay_s=config.token_delay_s)
    raise ValueError(f"unknown backend {config.backend!r} (expected tiny or openai)")


def parse_infer_payload(body: Any) -> dict[str, Any]:
    """Validate a worker job body: only ``infer`` is served here."""
    operation = parse_operation(body)
    if not isinstance(operation, Infer):
        raise wrong_operation(operation.operation, "'infer' (a worker serves only infer)")
    return operation.to_body()


class _StopSequence(Exception):
    """Raised out of the token sink when a stop string was generated: ends generation."""


class Worker:
    """One worker's state: its backend, its counters, its heartbeat loop, its stop."""

    def __init__(self, config: WorkerConfig, backend: Backend, registry: JobRegistry) -> None:
        self.config = config
        self.backend = backend
        self.registry = registry
        self.url: str | None = None
        self.queen_now: str | None = config.queen_url
        """The queen that answered the last heartbeat (the goodbye goes there)."""
        self.started_at = time.time()
        self.tokens_total = 0
        self.open_completions = 0
        """``/v1/chat/completions`` streams being served right now."""
        self.stopping = False
        """Set on SIGTERM: new jobs are refused (503), the queen stops scheduling here."""
        self.problem: str | None = None
        """Why the backend cannot serve right now (its upstream is unreachable), or None."""
        self._generating: dict[str, trio.CancelScope] = {}
        self._ending = False
        self.checking = False
        """True once :meth:`readiness_loop` runs (a daemon; an app served alone does not)."""
        self.checked = trio.Event()
        """Set once the backend was checked (heartbeats and ``/health`` wait for it)."""
        self.app: Any = None
        """The worker's quart app (set by :func:`build_app`)."""

    @property
    def state(self) -> str:
        """``stopping``, ``not_ready`` (see :attr:`problem`), ``busy`` or ``ready``."""
        if self.stopping:
            return "stopping"
        if self.problem is not None:
            return "not_ready"
        return "busy" if self.registry.running else "ready"

    async def execute(self, job_id: str, payload: Any) -> None:
        """The ``infer`` executor: each token becomes a ``token`` narration event.

        A worker stopping (SIGTERM) past its grace ends the job ``[ERROR] worker shutting
        down``; an unreachable upstream also marks the worker not ready.
        """
        request = parse_operation(payload)
        if not isinstance(request, Infer):
            raise ValueError(f"a worker serves only infer, not {request.operation}")
        if self._ending:
            raise WorkerStopping(
                f"worker shutting down: {self.config.worker_id} stopped before the job started"
            )
        if request.model != self.config.model:
            raise ValueError(
                f"worker {self.config.worker_id} serves model {self.config.model!r}, "
                f"not {request.model!r}"
            )
        narrate(
            "infer_start",
            f"Worker {self.config.worker_id} generating up to {request.max_tokens} tokens "
            f"with {request.model} ({self.backend.name})",
            worker_id=self.config.worker_id,
            model=request.model,
            backend=self.backend.name,
        )
        count = 0
        started = time.perf_counter()
        stops = request.stop or []
        longest = max(map(len, stops), default=0)
        text = ""

        def emit(token: str) -> None:
            nonlocal count, text
            if stops:
                # Look for a stop string that ends in this token (it may begin earlier).
                start = max(0, len(text) - longest + 1)
                text += token
                hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
                if hits:
                    token = token[: len(token) - (len(text) - min(hits))]
                    if token:
                        narrate("token", token, token=token, index=count)
                        count += 1
                        self.tokens_total += 1
                    raise _StopSequence
            narrate("token", token, token=token, index=count)
            count += 1
            self.tokens_total += 1

        finish = "stopped"
        with trio.CancelScope() as scope:
            self._generating[job_id] = scope
            try:
                finish = await self.backend.generate(request, emit)
            except _StopSequence:
                finish = "stop"
            except UpstreamError as exc:
                if exc.unreachable:
                    self._set_problem(str(exc))
                raise
            finally:
                del self._generating[job_id]
        if scope.cancelled_caught:
            raise WorkerStopping(
                f"worker shutting down: {self.config.worker_id} stopped after "
                f"{count} token(s) (grace {self.config.stop_grace_s:g}s)"
            )
        elapsed = time.perf_counter() - started
        rate = count / elapsed if elapsed > 0 else 0.0
        narrate(
            "infer_complete",
            f"Generated {count} tokens in {elapsed:.2f}s ({rate:.0f} tokens/s)",
            tokens=count,
            prompt_tokens=len(request.prompt.split()),
            finish_reason=finish,
            elapsed_s=round(elapsed, 4),
        )

    def _set_problem(self, problem: str | None) -> None:
        if problem != self.problem:
            if problem is None:
                logger.info("worker %s ready again (%s)", self.config.worker_id, self.problem)
            else:
                logger.warning("worker %s not ready: %s", self.config.worker_id, problem)
        self.problem = problem

    async def readiness_loop(self, url: str) -> None:
        """Check the backend every ``heartbeat_s`` (an upstream that stops answering makes
        the worker ``not_ready``: the queen does not schedule on it until it answers)."""
        self.checking = True
        while True:
            self._set_problem(await self.backend.check())
            self.checked.set()
            await trio.sleep(self.config.heartbeat_s)

    async def stop(self) -> None:
        """SIGTERM: refuse new jobs, tell the queen, let jobs in flight finish for
        ``stop_grace_s``, then end the rest with ``[ERROR] worker shutting down`` (one
        that does not end within a second is cancelled) and wait until their streams have
        carried the signal."""
        self.stopping = True
        await self.say_goodbye()
        grace = self.config.stop_grace_s
        active = self._active()
        if active:
            logger.info("stopping: %d job(s) in flight, grace %gs", len(active), grace)
        with trio.move_on_after(grace):
            await self._wait_ended(active)
        # Past the grace: generation stops (the job ends [ERROR] worker shutting down) and
        # a job that starts now (a queued one, its slot just freed) fails at once.
        self._ending = True
        left = self._active()
        for scope in self._generating.values():
            scope.cancel()
        if left:
            logger.warning("stopping: ending %d job(s) still in flight after %gs", len(left), grace)
        with trio.move_on_after(1.0):
            await self._wait_ended(left)
        for job_id in self._active():  # whatever did not end by itself
            self.registry.cancel_job(job_id, "worker shutting down")
        with trio.move_on_after(1.0):
            await self._wait_ended(left)
            # ... and until their streams have sent the signal and closed.
            service = job_service(self.app) if self.app is not None else None
            while service is not None and any(service.watchers(j) for j in active):  # noqa: ASYNC110 (no event for it)
                await trio.sleep(0.01)

    async def _wait_ended(self, job_ids: list[str]) -> None:
        """Return once every job of ``job_ids`` has ended."""
        async with trio.open_nursery() as nursery:
            for job_id in job_ids:
                nursery.start_soon(self.registry.wait, job_id)

    def _active(self) -> list[str]:
        """Ids of the jobs queued, running or waiting to retry here."""
        busy = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)
        return [r.id for state in busy for r in self.registry.list_jobs(state)]

    def health(self) -> dict[str, Any]:
        """What this worker reports in heartbeats."""
        return {
            "worker_id": self.config.worker_id,
            "model": self.config.model,
            "backend": self.backend.name,
            "hive_id": self.config.hive_id,
            "pid": os.getpid(),
            "running": self.registry.running,
            "capacity": self.config.max_concurrent,
            "tokens_total": self.tokens_total,
            "state": self.state,
            "ready": self.state in ("ready", "busy"),
            "problem": self.problem,
        }

    def _beat(self, state: str) -> dict[str, Any]:
        return {**self.health(), "url": self.url, "state": state}

    async def heartbeat_loop(self, url: str) -> None:
        """Tell the queen every ``heartbeat_s`` that this worker is alive and where.

        Queens sharing a store name each other in their answers (``queens``): when the
        queen this worker beats to stops answering, the next one that does is used, so
        the worker stays schedulable (by every queen) while any of them lives."""
        self.url = url
        queen = self.config.queen_url
        if not queen:
            return
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        # A fresh connection per beat: a kept-alive one would hold a stopping queen open
        # until its grace period ends.
        headers["Connection"] = "close"
        with trio.move_on_after(5.0):
            await self.checked.wait()
        queens = [queen.rstrip("/")]
        async with httpx.AsyncClient(timeout=httpx.Timeout(2.0), headers=headers) as client:
            warned = False
            while True:
                for target in list(queens):
                    try:
                        response = await client.post(
                            f"{target}/v1/workers/heartbeat", json=self._beat(self.state)
                        )
                        response.raise_for_status()
                    except httpx.HTTPError as exc:
                        if not warned:
                            logger.warning("heartbeat to %s failed: %s", target, exc)
                            warned = True
                        continue
                    if warned:
                        logger.info("heartbeats to %s go through again", target)
                    warned = False
                    logger.debug("heartbeat to %s: %s", target, self.state)
                    self.queen_now = target
                    queens = _queens_after(target, queens, response)
                    break
                await trio.sleep(self.config.heartbeat_s)

    async def say_goodbye(self) -> None:
        """Tell the queen this worker is stopping, so it is no longer scheduled."""
        queen = self.queen_now
        if not queen or self.url is None:
            return
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(1.0), headers=headers) as client:
                await client.post(
                    f"{queen.rstrip('/')}/v1/workers/heartbeat", json=self._beat("stopping")
                )
        except httpx.HTTPError as exc:
            logger.warning("goodbye heartbeat to %s failed: %s", queen, exc)

    async def watch_parent(self, url: str) -> None:
        """Stop (as on SIGTERM) when the hive that started this worker has gone away."""
        parent = self.config.parent_pid
        if parent is None:
            return
        while True:
            await trio.sleep(0.5)
            if os.getppid() != parent:
                break
        logger.warning("parent %d is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)


def _openai_route(app: Any, worker: Worker) -> None:
    """Serve ``POST /v1/chat/completions`` (streamed with ``stream: true``, else one JSON
    answer) and ``GET /v1/models`` from the tiny generator.

    Lets OpenAI clients (and another worker's ``openai`` backend) use a tiny worker.
    """
    from quart import Response, jsonify, request

    async def chat_completions() -> Any:
        if not isinstance(worker.backend, TinyBackend):
            return jsonify({"error": "not_supported", "detail": "only the tiny backend"}), 404
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return jsonify({"error": "invalid", "detail": "messages: a list is required"}), 422
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        try:
            infer = Infer(
                model=str(body.get("model") or worker.config.model),
                prompt=render_messages(messages),
                max_tokens=body.get("max_tokens") or 16,
                temperature=body.get("temperature", 0.7),
                top_p=body.get("top_p", 1.0),
                top_k=body.get("top_k", 0),
                seed=body.get("seed"),
            )
        except ValidationError as exc:
            return jsonify({"error": "invalid", "detail": json.loads(exc.json())}), 422
        delay = worker.backend.token_delay_s
        created = int(time.time())
        chunk_id = f"chatcmpl-{created}"
        tokens = tiny_tokens(
            infer.model,
            infer.prompt,
            max_tokens=infer.max_tokens,
            temperature=infer.temperature,
            top_p=infer.top_p,
            top_k=infer.top_k,
            seed=infer.seed,
        )
        usage = usage_object(len(infer.prompt.split()), infer.max_tokens)
        if not body.get("stream"):
            text = "".join(tokens)
            return jsonify(
                {
                    "id": chunk_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": infer.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": None,
                            "finish_reason": "length",
                        }
                    ],
                    "usage": usage,
                }
            )
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            return sse_frame(
                chat_chunk(chunk_id, created, infer.model, delta, finish, with_usage=with_usage)
            )

        async def body_chunks() -> AsyncIterator[bytes]:
            worker.open_completions += 1
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                for token in tokens:
                    if delay:
                        await trio.sleep(delay)
                    yield chunk({"content": token}, None)
                end = chunk({}, "length")
                if with_usage:
                    end += sse_frame(chat_chunk(chunk_id, created, infer.model, None, usage=usage))
                yield end + DONE_FRAME
            finally:
                worker.open_completions -= 1

        response = Response(body_chunks(), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.timeout = None
        return response

    async def models() -> Any:
        model = {"id": worker.config.model, "object": "model", "owned_by": "trio-jobs"}
        return jsonify({"object": "list", "data": [model]})

    app.add_url_rule("/v1/chat/completions", "chat_completions", chat_completions, methods=["POST"])
    app.add_url_rule("/v1/models", "models", models, methods=["GET"])


class _ReadinessGuard:
    """ASGI middleware in front of the worker's app: ``POST /v1/jobs`` while stopping is
    refused with 503 (no job is created, so the queen may send it elsewhere), and
    ``GET /health`` answers 503 with the reason while the worker is not ready."""

    def __init__(self, inner: Any, worker: Worker) -> None:
        self.inner = inner
        self.worker = worker

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        worker = self.worker
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            if worker.stopping and method == "POST" and path == "/v1/jobs":
                detail = f"worker {worker.config.worker_id} is shutting down"
                body = {"error": "worker stopping", "detail": detail}
                await _answer(send, 503, body, [(b"retry-after", b"1")])
                return
            if path == "/health" and worker.checking and not worker.checked.is_set():
                with trio.move_on_after(5.0):
                    await worker.checked.wait()
            if path == "/health" and method == "GET" and worker.state not in ("ready", "busy"):
                service = job_service(worker.app)
                base = service.health()[1] if service is not None else {}
                body = {**base, **worker.health(), "status": worker.state}
                await _answer(send, 503, body, [])
                return
        await self.inner(scope, receive, send)


async def _answer(send: Any, status: int, body: dict[str, Any], extra: list[Any]) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def build_app(config: WorkerConfig, registry: JobRegistry | None = None) -> tuple[Any, Worker]:
    """The worker's quart-trio app and its state."""
    registry = registry or make_registry()
    worker = Worker(config, make_backend(config), registry)
    app = create_app(
        registry,
        worker.execute,
        name="worker",
        parse_payload=parse_infer_payload,
        token=config.token,
        max_concurrent=config.max_concurrent,
        keepalive_s=KEEPALIVE_S,
        max_body_bytes=MAX_BODY_BYTES,
    )
    _openai_route(app, worker)
    app.asgi_app = _ReadinessGuard(app.asgi_app, worker)  # type: ignore[method-assign]
    worker.app = app
    return app, worker


async def serve_worker(
    config: WorkerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a worker until SIGTERM/SIGINT (or until its parent hive is gone).

    On the signal it stops as :meth:`Worker.stop` says: every job in flight ends with its
    own terminal signal before the server goes away, within ``stop_grace_s`` + ~1 s.
    """
    app, worker = build_app(config)
    backend = worker.backend
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(backend, OpenAIBackend):  # kept-alive connections to the upstream
            backend.transport = backend.open_transport()
            stack.push_async_callback(backend.transport.aclose)
        await run_daemon(
            app,
            host=host,
            port=port,
            name=f"worker {config.worker_id}",
            background=[worker.heartbeat_loop, worker.readiness_loop, worker.watch_parent],
            on_stop=worker.stop,
            stop_grace_s=config.stop_grace_s + 3.0,
            task_status=task_status,
        )


def _queens_after(answered: str, known: list[str], response: httpx.Response) -> list[str]:
    """The queens to beat to, the one that answered first, then the others it named."""
    try:
        named = response.json().get("queens") or []
    except (ValueError, AttributeError):
        named = []
    others = [str(u).rstrip("/") for u in named if isinstance(u, str)]
    return list(dict.fromkeys([answered, *known, *others]))
