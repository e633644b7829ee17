"""The hive daemon: worker processes and model files, each operation run as a job."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio

from trio_jobs import JobRegistry, JobStore, narrate, run_persistence
from trio_jobs.http import create_app

from .._daemon import run_daemon
from .._store import StoreSpec, make_store, start_store
from .._ui import add_ui_routes
from ..operations import (
    ModelDelete,
    ModelDownload,
    ModelGet,
    ModelList,
    WorkerDelete,
    WorkerGet,
    WorkerList,
    WorkerSpawn,
    operation_schema,
    parse_operation,
    wrong_operation,
)
from ._models import ModelStore
from ._supervisor import WorkerSupervisor

__all__ = ["HiveConfig", "Hive", "make_registry", "parse_hive_payload", "serve_hive"]

logger = logging.getLogger("servers.hive")


@dataclass
class HiveConfig:
    """How the hive runs; filled from flags and the config file.

    ``store``: where the hive's jobs are kept (memory here; the CLI defaults to a SQLite
    file); ``pg_schema``: the schema for a PostgreSQL store (one per hive);
    ``retention_s``: how long finished jobs stay in memory (a store keeps them longer);
    ``cors_origins``: origins whose web pages may use the API (CORS; none by default);
    ``allowed_hosts``: ``Host`` names the hive answers on loopback besides its own.
    """

    hive_id: str = "localhost"
    models_dir: str = "models"
    model_source: str | None = None
    queen_url: str | None = None
    worker_host: str = "127.0.0.1"
    worker_grace_s: float = 5.0
    worker_startup_timeout_s: float = 30.0
    heartbeat_s: float = 1.0
    token: str | None = None
    max_concurrent: int | None = None
    store: StoreSpec = field(default_factory=lambda: StoreSpec("memory"))
    pg_schema: str = "trio_jobs_hive"
    retention_s: float = 600.0
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)


def make_registry(store: JobStore | None = None, retention_s: float = 600.0) -> JobRegistry:
    """The hive's job registry, persisted to ``store`` when one is given."""
    return JobRegistry(actor="hive", retention=retention_s, store=store)


def parse_hive_payload(body: Any) -> dict[str, Any]:
    """Validate a hive job body: worker and model operations only."""
    operation = parse_operation(body)
    if not operation.should_forward_to_hive():
        raise wrong_operation(
            operation.operation, "a worker_* or model_* operation (this is a hive)"
        )
    return operation.to_body()


class Hive:
    """The hive's state and its job executor."""

    def __init__(self, config: HiveConfig, supervisor: WorkerSupervisor) -> None:
        self.config = config
        self.supervisor = supervisor
        self.models = ModelStore(config.models_dir, source=config.model_source)

    async def execute(self, job_id: str, payload: Any) -> None:
        op = parse_operation(payload)
        sup = self.supervisor
        if isinstance(op, WorkerSpawn):
            narrate(
                "worker_spawn",
                f"Spawning a {op.backend} worker for model {op.model} on hive {sup.hive_id}",
                model=op.model,
            )
            record = await sup.spawn(op)
            narrate(
                "worker_ready",
                f"Worker {record.id} ready on port {record.port} (pid {record.pid})",
                worker=record.to_dict(),
            )
        elif isinstance(op, WorkerList):
            workers = [w.to_dict() for w in sup.all()]
            lines = [
                f"{w['id']} {w['state']} pid={w['pid']} port={w['port']} model={w['model']}"
                for w in workers
            ]
            narrate(
                "worker_list",
                f"{len(workers)} worker(s) on hive {sup.hive_id}"
                + "".join(f"\n  {line}" for line in lines),
                workers=workers,
            )
        elif isinstance(op, WorkerGet):
            record = sup.get(op.id)
            narrate(
                "worker_get",
                f"{record.id}: {record.state}, pid {record.pid}, port {record.port}, "
                f"model {record.model}",
                worker=record.to_dict(),
            )
        elif isinstance(op, WorkerDelete):
            record = await sup.stop(op.id)
            narrate(
                "worker_deleted",
                f"Worker {record.id} stopped (exit code {record.returncode})",
                worker=record.to_dict(),
            )
        elif isinstance(op, ModelDownload):
            result = await self.models.download(op)
            narrate("model_ready", f"Model {op.model} ready at {result['path']}", model=result)
        elif isinstance(op, ModelList):
            models = self.models.list()
            narrate(
                "model_list",
                f"{len(models)} model(s) in {self.models.directory}"
                + "".join(f"\n  {m['id']} ({m['size']} bytes)" for m in models),
                models=models,
            )
        elif isinstance(op, ModelGet):
            info = await self.models.get(op.id)
            narrate(
                "model_get", f"{op.id}: {info['size']} bytes, sha256 {info['sha256']}", model=info
            )
        elif isinstance(op, ModelDelete):
            info = self.models.delete(op.id)
            narrate("model_deleted", f"Deleted model {op.id} ({info['size']} bytes)", model=info)
        else:
            raise ValueError(f"not a hive operation: {op.operation}")


async def register_with_queen(config: HiveConfig, url: str) -> None:
    """Tell the queen (``--queen``) this hive's alias and URL, retrying until it answers.

    A one-off announcement, not a heartbeat: workers report their own liveness.
    """
    if not config.queen_url:
        return
    headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
    body = {"alias": config.hive_id, "url": url}
    delay = 0.2
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0), headers=headers) as client:
        while True:
            try:
                response = await client.post(f"{config.queen_url.rstrip('/')}/v1/hives", json=body)
                if response.status_code < 400:
                    logger.info("registered with the queen at %s", config.queen_url)
                    return
                logger.warning("the queen refused the registration: %s", response.text[:200])
                return
            except httpx.HTTPError as exc:
                logger.info("queen at %s not reachable yet (%s)", config.queen_url, exc)
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def serve_hive(
    config: HiveConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 7834,
    registry: JobRegistry | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a hive until SIGTERM/SIGINT; its workers are stopped before it exits.

    With a store, its jobs are recovered before it listens and persisted while it runs.
    """
    owned = registry is None
    if registry is None:
        store = make_store(config.store, schema=config.pg_schema)
        registry = make_registry(store, config.retention_s)
    async with trio.open_nursery() as persistence:
        if owned and registry.store is not None:
            await start_store(persistence, config.store, run_persistence, registry)
            logger.info("hive: %d job(s) recovered from %s", len(registry), config.store)
        await _serve(config, registry, host, port, task_status)
        persistence.cancel_scope.cancel()


async def _serve(
    config: HiveConfig,
    registry: JobRegistry,
    host: str,
    port: int,
    task_status: trio.TaskStatus[str],
) -> None:
    async with trio.open_nursery() as workers_nursery:
        supervisor = WorkerSupervisor(
            workers_nursery,
            hive_id=config.hive_id,
            queen_url=config.queen_url,
            worker_host=config.worker_host,
            startup_timeout_s=config.worker_startup_timeout_s,
            grace_s=config.worker_grace_s,
            heartbeat_s=config.heartbeat_s,
            token=config.token,
        )
        hive = Hive(config, supervisor)
        app = create_app(
            registry,
            hive.execute,
            name="hive",
            parse_payload=parse_hive_payload,
            token=config.token,
            max_concurrent=config.max_concurrent,
            payload_schema=operation_schema(),
            cors_origins=config.cors_origins,
            allowed_hosts=config.allowed_hosts,
        )
        add_ui_routes(app)
        logger.info("hive %s: models in %s", config.hive_id, config.models_dir)
        await run_daemon(
            app,
            host=host,
            port=port,
            name=f"hive {config.hive_id}",
            background=[partial(register_with_queen, config)],
            on_stop=supervisor.stop_all,
            stop_grace_s=config.worker_grace_s + 2.0,
            task_status=task_status,
        )
        workers_nursery.cancel_scope.cancel()
