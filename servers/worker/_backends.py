"""Where a worker's tokens come from: the built-in tiny generator or an OpenAI upstream."""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import httpx
import trio

from ..operations import Infer
from ._tiny import tiny_tokens

__all__ = ["Backend", "OpenAIBackend", "TinyBackend", "TokenSink", "UpstreamError"]

TokenSink = Callable[[str], None]
"""Called once per generated token, in order."""


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Built once: loading the CA bundle for every request's client took 40-250 ms."""
    return httpx.create_ssl_context()


class UpstreamError(Exception):
    """The OpenAI-compatible upstream failed or answered something unreadable."""


class Backend(Protocol):
    """Generates the tokens of one ``infer`` request."""

    name: str

    async def generate(self, request: Infer, emit: TokenSink) -> str:
        """Call ``emit`` for each token; return the finish reason (``length``, ``stop``).

        Cancelling stops generation (for an upstream, the request is closed).
        """
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


@dataclass
class OpenAIBackend:
    """Streams ``/v1/chat/completions`` (``stream: true``) from an OpenAI-compatible server.

    llama.cpp's server, vLLM and Ollama all speak it. ``upstream_model`` overrides the model
    name sent upstream (default: the requested model).
    """

    base_url: str
    upstream_model: str | None = None
    api_key: str | None = None
    connect_timeout_s: float = 10.0
    name: str = "openai"
    client: httpx.AsyncClient | None = field(default=None, repr=False, compare=False)
    """A client kept open by whoever runs the backend (kept-alive connections to the
    upstream, see :meth:`open_client`); None: a client per request."""

    def open_client(self) -> httpx.AsyncClient:
        """A new client for the upstream (the caller enters and closes it)."""
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.connect_timeout_s, read=None), verify=_ssl_context()
        )

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[httpx.AsyncClient]:
        if self.client is not None:
            await trio.lowlevel.checkpoint()
            yield self.client
            return
        async with self.open_client() as client:
            yield client

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

    async def generate(self, request: Infer, emit: TokenSink) -> str:
        url = self.base_url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        timeout = httpx.Timeout(self.connect_timeout_s, read=None)
        finish = "stop"
        done = False
        async with (
            self._session() as client,
            client.stream(
                "POST",
                f"{url}/chat/completions",
                json=self._body(request),
                headers=headers,
                timeout=timeout,
            ) as response,
        ):
            if response.status_code >= 400:
                detail = (await response.aread()).decode(errors="replace")[:300]
                raise UpstreamError(f"upstream answered {response.status_code}: {detail}")
            # Read the body to its end (it ends right after [DONE]): leaving httpx's nested
            # async iterators half-consumed leaks them to the garbage collector.
            async with aclosing(cast(AsyncGenerator[str, None], response.aiter_lines())) as lines:
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
                        raise UpstreamError(f"unreadable upstream chunk: {data[:200]}") from None
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        emit(content)
                    if choice.get("finish_reason"):
                        finish = str(choice["finish_reason"])
        if not done:
            raise UpstreamError("upstream stream ended without data: [DONE]")
        return finish
