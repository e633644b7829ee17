"""Where a worker's tokens come from: the built-in tiny generator or an OpenAI upstream."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import trio

from trio_jobs._client._client import default_ssl_context
from trio_jobs._client._sse_decoder import SSEDecoder
from trio_jobs._client._transport import Http11Transport, Reply, environment_proxy

from ..operations import Infer
from ._tiny import tiny_tokens

__all__ = ["Backend", "OpenAIBackend", "TinyBackend", "TokenSink", "UpstreamError"]

logger = logging.getLogger("servers.worker")

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

    Requests go straight to an :class:`Http11Transport` (HTTP/1.1, kept-alive), below
    httpx's client: on a job's path to its first token, that client's layers cost more
    than the request itself. Proxies are not used.
    """

    base_url: str
    upstream_model: str | None = None
    api_key: str | None = None
    connect_timeout_s: float = 10.0
    check_timeout_s: float = 2.0
    name: str = "openai"
    transport: Http11Transport | None = field(default=None, repr=False, compare=False)
    """Connections kept open by whoever runs the backend (see :meth:`open_transport`);
    None: a transport per request."""

    def open_transport(self) -> Http11Transport:
        """A new transport for the upstream (the caller closes it). Warns when the
        environment names a proxy for the upstream: it is not used."""
        proxy = environment_proxy(httpx.URL(self.api_url))
        if proxy:
            logger.warning(
                "the environment names proxy %s for upstream %s; the worker connects "
                "to the upstream directly (add its host to NO_PROXY to silence this)",
                proxy,
                self.base_url,
            )
        return Http11Transport(verify=default_ssl_context())

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[Http11Transport]:
        if self.transport is not None:
            # No checkpoint here: the request goes out before anything else runs (the
            # job's first events are written meanwhile, while the upstream works).
            yield self.transport
            return
        transport = self.open_transport()
        try:
            yield transport
        finally:
            with trio.CancelScope(shield=True):
                await transport.aclose()

    @property
    def api_url(self) -> str:
        """The upstream's ``/v1`` root."""
        url = self.base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    def _headers(self, url: httpx.URL, body: bytes | None) -> list[tuple[bytes, bytes]]:
        headers = [(b"host", url.netloc), (b"user-agent", b"trio-jobs")]
        if body is not None:
            headers += [
                (b"accept", b"text/event-stream"),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ]
        if self.api_key:
            headers.append((b"authorization", f"Bearer {self.api_key}".encode()))
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
        url = httpx.URL(f"{self.api_url}/models")
        limit = self.check_timeout_s
        try:
            # On the kept transport when there is one: a check every heartbeat does not
            # connect each time, beside the requests it serves.
            with trio.fail_after(limit):
                async with self._session() as transport:
                    timeouts = dict.fromkeys(("connect", "read", "write"), limit)
                    reply = await transport.open(
                        "GET", url, self._headers(url, None), b"", timeouts
                    )
                    await _drain(reply, 1 << 20)
        except trio.TooSlowError:
            return f"upstream {self.base_url} is unreachable: no answer within {limit:g}s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"upstream {self.base_url} is unreachable: {_describe(exc)}"
        if reply.status >= 500:
            return f"upstream {self.base_url} answered {reply.status} to GET {url}"
        return None

    async def generate(self, request: Infer, emit: TokenSink) -> str:
        url = httpx.URL(f"{self.api_url}/chat/completions")
        body = json.dumps(self._body(request), separators=(",", ":")).encode()
        timeouts = {"connect": self.connect_timeout_s, "write": self.connect_timeout_s}
        finish = "stop"
        done = False
        count = 0
        try:
            async with self._session() as transport:
                reply = await transport.open("POST", url, self._headers(url, body), body, timeouts)
                try:
                    if reply.status >= 400:
                        detail = (await _drain(reply, 300)).decode(errors="replace")
                        raise UpstreamError(
                            f"upstream {self.base_url} answered {reply.status}: {detail}",
                            unreachable=reply.status >= 500,
                        )
                    # Read the body to its end (it ends right after [DONE]), which keeps
                    # the connection for the next request, unless the upstream goes on
                    # past max_tokens (another token, or no end within TAIL_S): then the
                    # connection is closed (in ``finally``).
                    decoder = SSEDecoder()
                    with trio.CancelScope() as tail:
                        async for chunk in reply.body:
                            for message in decoder.feed(chunk):
                                data = message.data.strip()
                                if done:
                                    continue
                                if data == "[DONE]":
                                    done = True
                                    continue
                                content, reason = _delta(data, self.base_url)
                                if content:
                                    if count >= request.max_tokens:  # it ignores max_tokens
                                        tail.cancel()
                                        break
                                    emit(content)
                                    count += 1
                                    if count >= request.max_tokens:
                                        tail.deadline = trio.current_time() + TAIL_S
                                if reason:
                                    finish = reason
                finally:
                    await reply.body.aclose()
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UpstreamError(
                f"upstream {self.base_url} is unreachable: {_describe(exc)}",
                unreachable=count == 0,
            ) from None
        if not done and count >= request.max_tokens:
            return "length"
        if not done:
            raise UpstreamError(f"upstream {self.base_url} ended its stream without [DONE]")
        return finish


def _delta(data: str, upstream: str) -> tuple[str | None, str | None]:
    """The content and finish reason of one streamed chunk."""
    try:
        choice = json.loads(data)["choices"][0]
        content = (choice.get("delta") or {}).get("content")
        reason = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise UpstreamError(f"unreadable chunk from upstream {upstream}: {data[:200]}") from None
    return (str(content) if content else None), (str(reason) if reason else None)


async def _drain(reply: Reply, limit: int) -> bytes:
    """The first ``limit`` bytes of a body, read to its end (which keeps the connection)
    or closed beyond a megabyte."""
    kept = b""
    seen = 0
    async for chunk in reply.body:
        kept += chunk[: max(0, limit - len(kept))]
        seen += len(chunk)
        if seen > 1 << 20:
            break
    await reply.body.aclose()
    return kept


def _describe(exc: Exception) -> str:
    """``ConnectError: All connection attempts failed`` (the type alone when it says nothing)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
