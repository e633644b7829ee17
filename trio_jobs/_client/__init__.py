"""The HTTP client of a trio-jobs server (httpx; trio-websocket for WebSocket streams).

``_client`` is the :class:`JobClient` facade; ``_connection`` the narrow seam the streams
talk through; ``_errors`` the one error-mapping table; ``_reconnect`` the reconnect policy
and resume cursor both streams share; ``_lines`` wire lines to items and outcomes;
``_sse_decoder``, ``_sse_stream`` and ``_ws_stream`` the two streams. It imports nothing
server-side: what it shares with the server's streams lives in ``trio_jobs._receive``.
"""

from ._client import DEFAULT_LIMITS as DEFAULT_LIMITS
from ._client import JobClient as JobClient
from ._client import SubmitOptions as SubmitOptions
from ._lines import WireLineReader as WireLineReader
from ._lines import raise_for_signal as raise_for_signal
from ._sse_stream import JobEventStream as JobEventStream
from ._ws_stream import JobWebSocketStream as JobWebSocketStream

__all__ = [
    "DEFAULT_LIMITS",
    "JobClient",
    "JobEventStream",
    "JobWebSocketStream",
    "SubmitOptions",
    "WireLineReader",
    "raise_for_signal",
]
