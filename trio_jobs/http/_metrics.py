"""Prometheus metrics of one job server, in a collector registry of its own.

Each app gets its own ``CollectorRegistry`` so that two servers in one process (tests,
queen and hive in a demo) never share or double-register series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .._job import Job
from .._models import JobState, Transition
from .._persist import persister_of
from .._registry import JobRegistry

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class _JobsCollector(Collector):
    """Jobs in memory by state and running jobs, read from the registry at scrape time."""

    def __init__(self, registry: JobRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        jobs = GaugeMetricFamily(
            "trio_jobs_jobs", "Jobs held in memory, by state.", labels=["state"]
        )
        for state, count in self._registry.counts().items():
            jobs.add_metric([state.value], count)
        yield jobs
        yield GaugeMetricFamily(
            "trio_jobs_running_jobs",
            "Jobs that are running or waiting to retry.",
            value=self._registry.running,
        )
        persister = persister_of(self._registry)
        if persister is None:
            return
        yield GaugeMetricFamily(
            "trio_jobs_store_up",
            "1 while the job store answered the last time it was used, else 0.",
            value=1 if persister.health.ok else 0,
        )
        yield CounterMetricFamily(
            "trio_jobs_store_rejected_writes",
            "Job writes the store refused, each isolated from the rest of its batch.",
            value=persister.rejected_rows,
        )
        yield GaugeMetricFamily(
            "trio_jobs_store_isolated_jobs",
            "Jobs whose writes the store refuses (retried alone).",
            value=len(persister.poisoned),
        )
        yield CounterMetricFamily(
            "trio_jobs_store_failed_flushes",
            "Flushes that failed because the store did (retried with backoff).",
            value=persister.failures,
        )

    def describe(self) -> Iterator[Any]:
        return iter(())


class ServerMetrics:
    """The metrics of one app; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, registry: JobRegistry) -> None:
        self.collectors = CollectorRegistry(auto_describe=True)
        self.collectors.register(_JobsCollector(registry))
        self.submitted = Counter(
            "trio_jobs_jobs_submitted",
            "Jobs created through POST /v1/jobs.",
            registry=self.collectors,
        )
        self.events_streamed = Counter(
            "trio_jobs_events_streamed",
            "Stream items (events and terminal signals) written to clients.",
            ["transport"],
            registry=self.collectors,
        )
        self.open_streams = Gauge(
            "trio_jobs_open_streams",
            "Client streams open right now.",
            ["transport"],
            registry=self.collectors,
        )
        self.duration = Histogram(
            "trio_jobs_job_duration_seconds",
            "Wall time from a job's start (or creation, if it never ran) to its end.",
            ["state"],
            buckets=DURATION_BUCKETS,
            registry=self.collectors,
        )
        self.sse_events = self.events_streamed.labels("sse")
        self.ws_events = self.events_streamed.labels("ws")
        self.sse_open = self.open_streams.labels("sse")
        self.ws_open = self.open_streams.labels("ws")
        registry.add_observer(self._observe)

    def _observe(self, job: Job, transition: Transition) -> None:
        if not transition.state.is_terminal or job.finished_at is None:
            return
        start = job.started_at if job.started_at is not None else job.created_at
        state: JobState = transition.state
        self.duration.labels(state.value).observe(max(0.0, job.finished_at - start))

    def render(self) -> bytes:
        return generate_latest(self.collectors)
