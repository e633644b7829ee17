"""OpenAI API benchmark: streamed chat through queen + worker against the upstream itself.

One local OpenAI-compatible upstream that generates as fast as it can (a tokenless tiny
worker's ``/v1/chat/completions``, its own process) is reached three ways in one run, with
the same client code (httpx over trio, one kept-alive connection, the raw SSE wire):

- **direct**: the client streams from the upstream;
- **trio-jobs**: the client streams from the queen's ``/v1/chat/completions``; the request
  is an ``infer`` job scheduled on a worker whose ``openai`` backend streams from the
  upstream (client -> queen -> worker -> upstream, three processes, two extra hops); the
  queen keeps its jobs in memory;
- **trio-jobs sqlite**: the same with a queen whose jobs are durable in SQLite (the
  default of a real queen: every job and event is stored, the job starts once committed);
- **floor: two bare relays**: two processes that only pass the bytes on (trio and h11,
  :mod:`benchmarks._relay`): what two hops cost on this machine before any work of ours;
- **litellm proxy** (when ``litellm[proxy]`` is installed): ``litellm --model openai/...
  --api_base <upstream>`` in front of the same upstream.

Figures: time to first token (the first non-empty content delta) p50/p90 over sequential
requests, and tokens/s of one long generation (best of a few). Ratios are to direct.
Goals: TTFT overhead <= 2 ms p50, throughput >= 0.8x direct.

Run: ``python -m benchmarks.bench_openai`` (or ``python -m benchmarks openai``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import trio

from ._util import now, report, stop

REPO = Path(__file__).resolve().parent.parent
MODEL = "bench"
TTFT_REQUESTS = 200
TTFT_TOKENS = 8
LONG_TOKENS = 5_000
REPEATS = 3
FLOOR = "floor: two bare relays"


@contextmanager
def _daemon(
    argv: list[str], name: str, env: dict[str, str] | None = None, module: str = "servers"
) -> Iterator[str]:
    """A ``python -m servers ...`` process; yields its URL (from ``listening on``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"{name} did not start: {line!r}")
        yield line.split()[-1].strip()
    finally:
        stop(proc)


@contextmanager
def _litellm(upstream: str, state: Path) -> Iterator[str | None]:
    """litellm's proxy in front of ``upstream``, or None when it is not installed."""
    exe = shutil.which("litellm") or str(Path(sys.executable).with_name("litellm"))
    if not Path(exe).exists():
        yield None
        return
    port = _free_port()
    env = {
        **os.environ,
        "OPENAI_API_KEY": "unused",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        "LITELLM_LOG": "ERROR",
    }
    argv = [exe, "--model", f"openai/{MODEL}", "--api_base", f"{upstream}/v1"]
    argv += ["--port", str(port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=state
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            yield None
            return
        yield url
    finally:
        stop(proc)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_model(queen: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = httpx.get(f"{queen}/v1/models").json()["data"]
        if any(m["id"] == MODEL for m in models):
            return
        time.sleep(0.1)
    raise RuntimeError("the worker never registered with the queen")


async def _one(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> tuple[float, int]:
    """Stream one chat completion: (seconds to the first content token, content chunks)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "benchmark"}],
        "max_tokens": tokens,
        "stream": True,
    }
    started = now()
    first = 0.0
    count = 0
    done = False
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                count += 1
                if not first:
                    first = now() - started
    if not done:
        raise RuntimeError(f"{url}: the stream ended without [DONE]")
    return first, count


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(targets: dict[str, tuple[str, str]]) -> None:
    timeout = httpx.Timeout(60, read=None)
    ttft: dict[str, list[float]] = {name: [] for name in targets}
    rate: dict[str, float] = dict.fromkeys(targets, 0.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        for url, model in targets.values():  # warm up every path
            for _ in range(5):
                await _one(client, url, model, TTFT_TOKENS)
        # Interleaved, so that a noisy moment of the machine hits every target alike.
        for _ in range(TTFT_REQUESTS):
            for name, (url, model) in targets.items():
                first, _ = await _one(client, url, model, TTFT_TOKENS)
                ttft[name].append(first)
        for _ in range(REPEATS):
            for name, (url, model) in targets.items():
                started = now()
                _, count = await _one(client, url, model, LONG_TOKENS)
                assert count == LONG_TOKENS, (name, count)
                rate[name] = max(rate[name], count / (now() - started))
    direct = ttft["direct"]
    base50 = _pct(direct, 0.5) * 1e3
    for name in targets:
        p50, p90 = (_pct(ttft[name], q) * 1e3 for q in (0.5, 0.9))
        extra = "" if name == "direct" else f", +{p50 - base50:.2f} ms p50"
        report(
            f"TTFT {name}, p50 / p90 of {TTFT_REQUESTS}",
            f"{p50:.2f} / {p90:.2f} ms{extra}",
            p50 / base50,
            "overhead <= 2 ms p50" if name.startswith("trio-jobs") else "",
        )
    floor = _pct(ttft[FLOOR], 0.5) * 1e3
    for name in targets:
        if name.startswith("trio-jobs"):
            # What the daemons' own work adds, beyond what two hops cost at all.
            mine = _pct(ttft[name], 0.5) * 1e3 - floor
            report(f"TTFT {name}, p50 added beyond the floor", f"+{mine:.2f} ms")
    for name in targets:
        report(
            f"tokens/s {name}, {LONG_TOKENS} tokens streamed",
            f"{rate[name]:,.0f}",
            rate[name] / rate["direct"],
            ">= 0.8x" if name.startswith("trio-jobs") else "",
        )


def main() -> None:
    """Start upstream, queen, worker (and litellm); measure every path in one run."""
    print("OpenAI API: client -> queen -> worker(openai backend) -> upstream, vs direct")
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(_tempdir()))
        upstream = stack.enter_context(
            _daemon(["worker", "--port", "0", "--model", MODEL], "upstream")
        )
        targets = {"direct": (upstream, MODEL)}
        for name, store in (("trio-jobs", "memory"), ("trio-jobs sqlite", f"sqlite:{tmp}/q.db")):
            queen = stack.enter_context(
                _daemon(["queen", "--port", "0", "--store", store], f"queen ({store})")
            )
            stack.enter_context(
                _daemon(
                    [
                        *("worker", "--port", "0", "--model", MODEL, "--backend", "openai"),
                        *("--upstream-url", upstream, "--queen", queen, "--heartbeat-s", "0.5"),
                    ],
                    "worker",
                )
            )
            _wait_model(queen)
            targets[name] = (queen, MODEL)
        # The floor: two relays that do nothing but pass bytes (benchmarks/_relay.py).
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        inner = stack.enter_context(_daemon([host, port], "relay", module="benchmarks._relay"))
        host, port = inner.removeprefix("http://").rsplit(":", 1)
        outer = stack.enter_context(_daemon([host, port], "relay", module="benchmarks._relay"))
        targets[FLOOR] = (outer, MODEL)
        litellm = stack.enter_context(_litellm(upstream, tmp))
        if litellm is not None:
            targets["litellm proxy"] = (litellm, f"openai/{MODEL}")
        else:
            print("  (litellm[proxy] is not installed: its figures are left out)")
        trio.run(run, targets)


@contextmanager
def _tempdir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-openai-") as path:
        yield path


if __name__ == "__main__":
    main()
