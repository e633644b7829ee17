"""The dashboard (``GET /ui``): one static page shipped with the package, for every daemon.

:func:`add_ui_routes` mounts it on an app that already carries the job blueprint (queen,
hive). The page is plain HTML, CSS and JavaScript read from this package (no CDN, no build
step, works offline); it holds no data itself, so ``/ui`` and its two assets are served
without a token, and everything it shows comes from the API with the same bearer token as
any other client. See the README section "Dashboard" for the design of the sign-in.

Besides the page, two small JSON routes the API has no equivalent of (both behind auth):

* ``GET /ui/throughput``: jobs finished per state over the last minutes, sampled from the
  service's own Prometheus counters (``trio_jobs_job_duration_seconds_count``) every
  ``sample_s`` seconds while the app serves;
* ``GET /ui/hives`` (when the daemon passes ``hive_health``): each configured hive and
  what its ``/health`` answered, as the queen sees it (a page cannot ask other origins).

Every ``/ui`` answer carries a strict Content-Security-Policy: scripts, styles and
requests from this origin only, no inline code, no framing, no form submissions.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

from trio_jobs.http import job_service

__all__ = ["CSP", "ThroughputSampler", "add_ui_routes"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The Content-Security-Policy of every ``/ui`` response."""

_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

_ASSETS = {
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
}

HiveHealth = Callable[[], Awaitable[list[dict[str, Any]]]]


def _respond(body: bytes, content_type: str, status: int = 200) -> Response:
    response = Response(body, status=status, content_type=content_type)
    for key, value in _SECURITY_HEADERS.items():
        response.headers[key] = value
    return response


class ThroughputSampler:
    """Cumulative counts of finished jobs per state, sampled from ``read_counts``.

    Keeps ``keep`` samples, one every ``interval_s`` seconds: the page draws the
    differences between neighbours, so it shows the last minutes as soon as it opens.
    """

    def __init__(
        self, read_counts: Callable[[], dict[str, float]], interval_s: float, keep: int
    ) -> None:
        self.read_counts = read_counts
        self.interval_s = interval_s
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)

    def sample(self) -> dict[str, Any]:
        """The counts now, as ``{"at": epoch seconds, "counts": {state: n}}``."""
        return {"at": round(time.time(), 3), "counts": self.read_counts()}

    async def run(self) -> None:
        """Take a sample every ``interval_s`` until cancelled."""
        while True:
            self.samples.append(self.sample())
            await trio.sleep(self.interval_s)

    def to_dict(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "samples": [*self.samples, self.sample()]}


def add_ui_routes(
    app: QuartTrio,
    *,
    hive_health: HiveHealth | None = None,
    sample_s: float = 5.0,
    keep_samples: int = 120,
) -> None:
    """Serve the dashboard on ``app`` (which must carry the job blueprint).

    Args:
        app: a daemon's app, made by ``trio_jobs.http.create_app``.
        hive_health: the queen's probe of its hives' ``/health`` (adds ``/ui/hives``).
        sample_s: seconds between throughput samples.
        keep_samples: samples kept (``sample_s * keep_samples`` seconds of history).

    Raises:
        RuntimeError: ``app`` has no job blueprint.
        ValueError: ``sample_s`` not positive or fewer than two samples kept.
    """
    if not sample_s > 0 or keep_samples < 2:
        raise ValueError("sample_s must be > 0 and keep_samples >= 2")
    service = job_service(app)
    if service is None:
        raise RuntimeError("add_ui_routes needs an app with the job blueprint mounted")
    assets = files(__name__) / "static"
    bodies = {path: ((assets / name).read_bytes(), kind) for path, (name, kind) in _ASSETS.items()}
    service.public_paths.update(bodies)
    service.public_paths.add("/ui/")

    def read_counts() -> dict[str, float]:
        counts: dict[str, float] = {}
        for metric in service.metrics.duration.collect():
            for sample in metric.samples:
                if sample.name.endswith("_count"):
                    counts[sample.labels["state"]] = sample.value
        return counts

    sampler = ThroughputSampler(read_counts, sample_s, keep_samples)

    async def asset() -> Response:
        path = request.path.rstrip("/") or "/ui"
        body, kind = bodies[path]
        return _respond(body, kind)

    async def throughput() -> Response:
        return _respond(json.dumps(sampler.to_dict()).encode(), "application/json")

    async def start_sampler() -> None:
        app.nursery.start_soon(sampler.run)

    for path in (*bodies, "/ui/"):
        app.add_url_rule(path, f"ui_asset{path.replace('/', '_')}", asset, methods=["GET"])
    app.add_url_rule("/ui/throughput", "ui_throughput", throughput, methods=["GET"])
    if hive_health is not None:
        probe = hive_health

        async def hives() -> Response:
            body = json.dumps({"hives": await probe()}, default=str).encode()
            return _respond(body, "application/json")

        app.add_url_rule("/ui/hives", "ui_hives", hives, methods=["GET"])
    app.before_serving(start_sampler)
