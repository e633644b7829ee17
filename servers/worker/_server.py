"""The worker daemon: serves ``infer`` jobs, streams tokens as narration, heartbeats the queen."""

from __future__ import annotations

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

from trio_jobs import JobRegistry, narrate
from trio_jobs.http import create_app

from .._daemon import run_daemon
from ..operations import Infer, parse_operation, wrong_operation
from ._backends import Backend, OpenAIBackend, TinyBackend
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


class Worker:
    """One worker's state: its backend, its counters, its heartbeat loop."""

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

    async def execute(self, job_id: str, payload: Any) -> None:
        """The ``infer`` executor: each token becomes a ``token`` narration event."""
        request = parse_operation(payload)
        if not isinstance(request, Infer):
            raise ValueError(f"a worker serves only infer, not {request.operation}")
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

        def emit(token: str) -> None:
            nonlocal count
            narrate("token", token, token=token, index=count)
            count += 1
            self.tokens_total += 1

        finish = await self.backend.generate(request, emit)
        elapsed = time.perf_counter() - started
        rate = count / elapsed if elapsed > 0 else 0.0
        narrate(
            "infer_complete",
            f"Generated {count} tokens in {elapsed:.2f}s ({rate:.0f} tokens/s)",
            tokens=count,
            finish_reason=finish,
            elapsed_s=round(elapsed, 4),
        )

    def health(self) -> dict[str, Any]:
        """What this worker reports in heartbeats."""
        return {
            "worker_id": self.config.worker_id,
            "model": self.config.model,
            "backend": self.backend.name,
            "hive_id": self.config.hive_id,
            "pid": os.getpid(),
            "running": self.registry.running,
            "tokens_total": self.tokens_total,
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
        queens = [queen.rstrip("/")]
        async with httpx.AsyncClient(timeout=httpx.Timeout(2.0), headers=headers) as client:
            warned = False
            while True:
                state = "busy" if self.registry.running else "ready"
                for target in list(queens):
                    try:
                        response = await client.post(
                            f"{target}/v1/workers/heartbeat", json=self._beat(state)
                        )
                        response.raise_for_status()
                    except httpx.HTTPError as exc:
                        if not warned:
                            logger.warning("heartbeat to %s failed: %s", target, exc)
                            warned = True
                        continue
                    warned = False
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
            logger.info("goodbye heartbeat failed: %s", exc)

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
        prompt = "\n".join(
            str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict)
        )
        try:
            infer = Infer(
                model=str(body.get("model") or worker.config.model),
                prompt=prompt,
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
        tokens = tiny_tokens(
            infer.model,
            infer.prompt,
            max_tokens=infer.max_tokens,
            temperature=infer.temperature,
            top_p=infer.top_p,
            top_k=infer.top_k,
            seed=infer.seed,
        )
        if not body.get("stream"):
            text = "".join(tokens)
            return jsonify(
                {
                    "id": f"chatcmpl-{created}",
                    "object": "chat.completion",
                    "created": created,
                    "model": infer.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "length",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": len(infer.prompt.split()),
                        "completion_tokens": infer.max_tokens,
                        "total_tokens": len(infer.prompt.split()) + infer.max_tokens,
                    },
                }
            )

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            data = {
                "id": f"chatcmpl-{created}",
                "object": "chat.completion.chunk",
                "created": created,
                "model": infer.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(data)}\n\n".encode()

        async def body_chunks() -> AsyncIterator[bytes]:
            worker.open_completions += 1
            try:
                yield chunk({"role": "assistant"}, None)
                for token in tokens:
                    if delay:
                        await trio.sleep(delay)
                    yield chunk({"content": token}, None)
                yield chunk({}, "length")
                yield b"data: [DONE]\n\n"
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
    )
    _openai_route(app, worker)
    return app, worker


async def serve_worker(
    config: WorkerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a worker until SIGTERM/SIGINT (or until its parent hive is gone)."""
    app, worker = build_app(config)
    await run_daemon(
        app,
        host=host,
        port=port,
        name=f"worker {config.worker_id}",
        background=[worker.heartbeat_loop, worker.watch_parent],
        on_stop=worker.say_goodbye,
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
