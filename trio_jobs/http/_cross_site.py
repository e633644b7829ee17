"""Cross-site rules and opt-in CORS, as the outermost ASGI layer of a job app.

A web page can make a browser send requests to any server the browser reaches, loopback
ones included, and a DNS name the page controls can be pointed at 127.0.0.1 (DNS
rebinding). Every request of a job app, the ``DELETE`` fast path's included, meets these
rules, each checked by one function:

* a server bound to loopback answers only ``Host`` names of its own (``localhost``,
  loopback addresses, the bound address, and the configured ``allowed_hosts``): 421;
* a request whose ``Origin`` is neither the server's own (``scheme://host:port`` of the
  request) nor one of ``cors_origins`` gets 403, WebSocket handshakes included. These two
  are :meth:`SitePolicy.refusal`, applied by :class:`CrossSiteGuard` in front of
  everything else (Quart, its hooks and routes, and the fast path);
* a state-changing request (``POST``, ``DELETE``) to a route that takes it must say
  ``Content-Type: application/json`` (a ``DELETE`` without a body may say nothing; one
  with a body is refused): 415. A page can send a ``POST`` with a "simple" content type
  (``text/plain``, a form) cross-site without asking; with ``application/json`` the
  browser must ask first (a CORS preflight), which an origin that is not allowed never
  passes. This one needs the routing (an undeclared method is a 405 first), so it is
  :func:`content_refusal`, called by the blueprint's request hook and by the ``DELETE``
  fast path.

CORS is opt-in: only origins in ``cors_origins`` get ``Access-Control-Allow-Origin`` (and
their preflights a 204); every HTTP answer says ``Vary: Origin``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
    WebsocketScope,
)

from ._errors import ApiError, error_body
from ._guard import has_body
from ._service import is_loopback

__all__ = ["CrossSiteGuard", "SitePolicy", "content_refusal", "parse_origin"]

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
ConnectionScope = HTTPScope | WebsocketScope

ALLOW_METHODS = "GET, HEAD, POST, DELETE"
ALLOW_HEADERS = ", ".join(
    [
        "Authorization",
        "Content-Type",
        "Last-Event-ID",
        # What the openai SDKs send from a browser page (the queen's OpenAI API).
        "OpenAI-Organization",
        "OpenAI-Project",
        *(
            f"X-Stainless-{name}"
            for name in [
                "Arch",
                "Lang",
                "OS",
                "Package-Version",
                "Retry-Count",
                "Runtime",
                "Runtime-Version",
                "Timeout",
            ]
        ),
    ]
)
EXPOSE_HEADERS = "Location, X-Job-Id"
MAX_AGE_S = 600

_WRITES = frozenset({"POST", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_VARY = (b"vary", b"Origin")

Origin = tuple[str, str, int]
"""``(scheme, host, port)``, lower case, the port filled in from the scheme."""


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (``[v6]:port`` too) as ``(host, port)``, lower case; None if bad."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = value.partition(":")
        if sep and not port_text:
            return None
    host = host.rstrip(".")
    if not host or any(c in host for c in "/\\@ ?#"):
        return None
    if port_text:
        if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
            return None
        return host, int(port_text)
    return host, None


def parse_origin(value: str) -> Origin | None:
    """An ``Origin`` (``scheme://host[:port]``, http or https) as :data:`Origin`."""
    scheme, sep, rest = value.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS or not rest:
        return None
    parts = _split_host(rest)
    if parts is None:
        return None
    host, port = parts
    return scheme, host, _DEFAULT_PORTS[scheme] if port is None else port


class SitePolicy:
    """Which origins may read cross-origin (CORS) and which extra ``Host`` names a
    loopback server answers (a reverse proxy's). See the module docstring.

    Raises:
        ValueError: an origin that is not ``http(s)://host[:port]``, or a bad host name.
    """

    def __init__(self, cors_origins: Iterable[str] = (), allowed_hosts: Iterable[str] = ()):
        origins: set[Origin] = set()
        for value in cors_origins:
            origin = parse_origin(value)
            if origin is None or value.strip().rstrip("/") != value.strip():
                raise ValueError(
                    f"CORS origin {value!r} must look like http(s)://host[:port] (no path)"
                )
            origins.add(origin)
        hosts: set[str] = set()
        for value in allowed_hosts:
            parts = _split_host(value)
            if parts is None or parts[1] is not None:
                raise ValueError(f"allowed host {value!r} must be a host name (no port)")
            hosts.add(parts[0])
        self.cors_origins = frozenset(origins)
        self.allowed_hosts = frozenset(hosts)

    def cors_allowed(self, origin: str) -> bool:
        """Whether ``origin`` is on the CORS allow-list."""
        parsed = parse_origin(origin)
        return parsed is not None and parsed in self.cors_origins

    def refusal(self, scope: ConnectionScope) -> ApiError | None:
        """The error this request (HTTP or WebSocket handshake) must get, or None."""
        host = origin = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
        own = _split_host(host) if host is not None else None
        server = scope.get("server")
        bound = str(server[0]).strip("[]").lower() if server else None
        if is_loopback(bound):
            own_name = own[0] if own is not None else None
            if own_name is None or not (
                is_loopback(own_name) or own_name in self.allowed_hosts or own_name == bound
            ):
                return ApiError(
                    421,
                    "misdirected request",
                    f"this server answers only its own host names, not {host!r}; "
                    "allow others with allowed_hosts (--allowed-host)",
                )
        if origin is not None and not self._same_or_allowed(origin, own, scope["scheme"]):
            return ApiError(
                403,
                "forbidden",
                f"requests from the origin {origin!r} are not allowed; "
                "allow it with cors_origins (--cors-origin)",
            )
        return None

    def _same_or_allowed(
        self, origin: str, own: tuple[str, int | None] | None, scheme: str
    ) -> bool:
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        if parsed in self.cors_origins:
            return True
        if own is None:
            return False
        own_scheme = "https" if scheme in ("https", "wss") else "http"
        own_host, own_port = own
        return parsed == (
            own_scheme,
            own_host,
            _DEFAULT_PORTS[own_scheme] if own_port is None else own_port,
        )


def content_refusal(method: str, headers: Iterable[tuple[bytes, bytes]]) -> ApiError | None:
    """The 415 (or 400) a routed ``POST``/``DELETE`` with these ASGI headers must get."""
    if method not in _WRITES:
        return None
    headers = list(headers)
    body = has_body(headers)
    content_type = None
    for name, value in headers:
        if name == b"content-type":
            content_type = value.decode("latin-1")
            break
    if method == "DELETE" and content_type is None and not body:
        return None
    if not _is_json(content_type):
        return ApiError(
            415,
            "unsupported media type",
            f"send {method} requests as Content-Type: application/json"
            + (f" (got {content_type!r})" if content_type is not None else ""),
        )
    if method == "DELETE" and body:
        return ApiError(400, "bad request", "a DELETE takes no body")
    return None


def _is_json(content_type: str | None) -> bool:
    """``application/json``, with no parameter but ``charset=utf-8``."""
    if content_type is None:
        return False
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    if media != "application/json":
        return False
    for param in params:
        key, _, value = param.partition("=")
        if key.strip() != "charset" or value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def send_json_error(send: ASGISendCallable, error: ApiError, scope: ConnectionScope) -> None:
    """Answer ``error`` as a JSON body straight over ASGI (an HTTP request or a refused
    WebSocket handshake); says ``Connection: close`` when the request's body is unread."""
    body = error_body(error.error, error.detail)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        _VARY,
        *_encode(error.headers),
    ]
    if scope["type"] == "websocket":
        await send(
            {"type": "websocket.http.response.start", "status": error.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        return
    if has_body(scope["headers"]):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class CrossSiteGuard:
    """ASGI middleware applying a :class:`SitePolicy` to every request of ``app``."""

    def __init__(self, app: ASGIApp, policy: SitePolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            error = self.policy.refusal(scope)
            if error is None:
                await self.app(scope, receive, send)
            else:
                await self._refuse_handshake(scope, receive, send, error)
        else:
            await self.app(scope, receive, send)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        error = self.policy.refusal(scope)
        if error is not None:
            await send_json_error(send, error, scope)
            return
        origin = _header(scope, b"origin")
        if origin is None or not self.policy.cors_allowed(origin):
            extra = [_VARY]
        elif (
            scope["method"] == "OPTIONS"
            and _header(scope, b"access-control-request-method") is not None
        ):
            await self._preflight(send, origin)
            return
        else:
            extra = [
                _VARY,
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-expose-headers", EXPOSE_HEADERS.encode()),
            ]

        async def send_with_cors(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, send: ASGISendCallable, origin: str) -> None:
        headers = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", ALLOW_METHODS.encode()),
            (b"access-control-allow-headers", ALLOW_HEADERS.encode()),
            (b"access-control-max-age", str(MAX_AGE_S).encode()),
            _VARY,
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _refuse_handshake(
        self,
        scope: WebsocketScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        error: ApiError,
    ) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await send_json_error(send, error, scope)
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": error.error})


def _header(scope: ConnectionScope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
