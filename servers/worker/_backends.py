"""Where a worker's tokens come from: the built-in tiny generator or an OpenAI upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import httpx
import trio

from trio_jobs._client._client import default_ssl_context
from trio_jobs._client._transport import coalescing_transport

from ..operations import Infer
from ._tiny import tiny_tokens

__all__ = ["Backend", "OpenAIBackend", "TinyBackend", "TokenSink", "UpstreamError"]

TAIL_S = 0.5
"""After ``max_tokens`` tokens, how long the upstream's own end (finish chunk, ``[DONE]``)
is waited for before its response is closed (a closed response loses its connection)."""

TokenSink = Callable[[str], None]
"""Called once per generated token, in order."""


class UpstreamError(Exception):
    """The OpenAI-compatible upstream failed or answered something unreadable; the message
    names the upstream URL. ``unreachable``: it could not be reached at all."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class Backend(Protocol):
    """Generates the tokens of one ``infer`` request."""

    name: str

    async def generate(self, request: Infer, emit: TokenSink) -> str:
        """Call ``emit`` for each token; return the finish reason (``length``, ``stop``).

        Cancelling stops generation (for an upstream, the request is closed).
        """
        ...

    async def check(self) -> str | None:
        """None when the backend can serve; otherwise why not (naming what is missing)."""
        ...


@dataclass
class TinyBackend:
    """The deterministic built-in generator; ``token_delay_s`` paces it like a real model."""

    token_delay_s: float = 0.0
    name: str = "tiny"

    async def generate(self, request: Infer, emit: TokenSink) -> str:
        tokens = tiny_tokens(
            request.model,
            request.prompt,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
        )
        for token in tokens:
            if self.token_delay_s > 0:
                await trio.sleep(self.token_delay_s)
            else:
                await trio.lowlevel.checkpoint()
            emit(token)
        return "length"

    async def check(self) -> str | None:
        await trio.lowlevel.checkpoint()
        return None


@dataclass
class OpenAIBackend:
    """Streams ``/v1/chat/completions`` (``stream: true``) from an OpenAI-compatible server.

    llama.cpp's server, vLLM and Ollama all speak it. ``upstream_model`` overrides the model
    name sent upstream (default: the requested model). ``max_tokens`` is sent upstream and
    also enforced here: generation stops after that many content chunks (one token each
    on those servers) even if the upstream ignores it. Errors name the upstream URL.
    """

    base_url: str
    upstream_model: str | None = None
    api_key: str | None = None
    connect_timeout_s: float = 10.0
    check_timeout_s: float = 2.0
    name: str = "openai"
    client: httpx.AsyncClient | None = field(default=None, repr=False, compare=False)
    """A client kept open by whoever runs the backend (kept-alive connections to the
    upstream, see :meth:`open_client`); None: a client per request."""

    def open_client(self) -> httpx.AsyncClient:
        """A new client for the upstream (the caller enters and closes it)."""
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.connect_timeout_s, read=None),
            transport=coalescing_transport(verify=default_ssl_context()),
        )

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[httpx.AsyncClient]:
        if self.client is not None:
            await trio.lowlevel.checkpoint()
            yield self.client
            return
        async with self.open_client() as client:
            yield client

    @property
    def api_url(self) -> str:
        """The upstream's ``/v1`` root."""
        url = self.base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _body(self, request: Infer) -> dict[str, Any]:
        messages = request.messages or [{"role": "user", "content": request.prompt}]
        body: dict[str, Any] = {
            "model": self.upstream_model or request.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
        }
        if request.top_k:
            body["top_k"] = request.top_k
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = request.stop
        return body

    async def check(self) -> str | None:
        """``GET /v1/models`` on the upstream: any answer below 500 means it is up."""
        url = f"{self.api_url}/models"
        try:
            # On the kept client when there is one: a check every heartbeat no longer
            # connects (and builds a client) each time, beside the requests it serves.
            async with self._session() as client:
                response = await client.get(
                    url, headers=self._headers(), timeout=self.check_timeout_s
                )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"upstream {self.base_url} is unreachable: {_describe(exc)}"
        if response.status_code >= 500:
            return f"upstream {self.base_url} answered {response.status_code} to GET {url}"
        return None

    async def generate(self, request: Infer, emit: TokenSink) -> str:
        url = f"{self.api_url}/chat/completions"
        timeout = httpx.Timeout(self.connect_timeout_s, read=None)
        finish = "stop"
        done = False
        count = 0
        try:
            async with (
                self._session() as client,
                client.stream(
                    "POST",
                    url,
                    json=self._body(request),
                    headers=self._headers(),
                    timeout=timeout,
                ) as response,
            ):
                if response.status_code >= 400:
                    detail = (await response.aread()).decode(errors="replace")[:300]
                    raise UpstreamError(
                        f"upstream {self.base_url} answered {response.status_code}: {detail}",
                        unreachable=response.status_code >= 500,
                    )
                # Read the body to its end (it ends right after [DONE]), which keeps the
                # connection for the next request, unless the upstream goes on past
                # max_tokens (another token, or no end within TAIL_S): then the
                # response is closed. aclosing() closes httpx's nested iterators either way.
                lines = cast(AsyncGenerator[str, None], response.aiter_lines())
                async with aclosing(lines):
                    with trio.CancelScope() as tail:
                        async for line in lines:
                            if done or not line.startswith("data:"):
                                continue
                            data = line[5:].strip()
                            if data == "[DONE]":
                                done = True
                                continue
                            try:
                                chunk = json.loads(data)
                                choice = chunk["choices"][0]
                            except (ValueError, KeyError, IndexError, TypeError):
                                raise UpstreamError(
                                    f"unreadable chunk from upstream {self.base_url}: {data[:200]}"
                                ) from None
                            content = (choice.get("delta") or {}).get("content")
                            if content:
                                if count >= request.max_tokens:  # it ignores max_tokens
                                    break
                                emit(content)
                                count += 1
                                if count >= request.max_tokens:
                                    tail.deadline = trio.current_time() + TAIL_S
                            if choice.get("finish_reason"):
                                finish = str(choice["finish_reason"])
                    if not done and count >= request.max_tokens:
                        await _close_early(response, lines)
                        return "length"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UpstreamError(
                f"upstream {self.base_url} is unreachable: {_describe(exc)}",
                unreachable=count == 0,
            ) from None
        if not done:
            raise UpstreamError(f"upstream {self.base_url} ended its stream without [DONE]")
        return finish


async def _close_early(response: httpx.Response, lines: AsyncGenerator[str, None]) -> None:
    """Stop reading a body before its end: close the response, then drive the reader until
    the closed connection ends it, which finishes httpx's nested generators (left to the
    garbage collector, they are reported as a ResourceWarning). Bounded: 1 s."""
    with trio.move_on_after(1.0):
        with suppress(httpx.HTTPError):
            await response.aclose()
        for _ in range(10_000):
            try:
                await lines.__anext__()
            except StopAsyncIteration:
                break
            except Exception:  # whatever a closed transport raises: the reader is done
                break


def _describe(exc: Exception) -> str:
    """``ConnectError: All connection attempts failed`` (the type alone when it says nothing)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
