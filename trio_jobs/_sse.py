"""An incremental ``text/event-stream`` decoder (WHATWG HTML, "Server-sent events" §9.2.6).

httpx-sse hands out one event per async-generator step and dispatches blocks that carry no
data (our ``retry:`` preamble would come out as an empty event). This decoder takes whatever
bytes arrived and returns every complete message in them at once, so a client can drain a
whole network chunk without a scheduler trip per event (the speed lever in PITFALLS).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEMessage"]


@dataclass(frozen=True, slots=True)
class SSEMessage:
    """One dispatched event: its ``data`` (lines joined by ``\\n``) and the last event id."""

    data: str
    id: str | None = None
    event: str = "message"


class SSEDecoder:
    """Feed it bytes in any split; it returns the messages completed by each piece.

    ``last_event_id`` is the id in force at the last dispatch (what a reconnect sends as
    ``Last-Event-ID``; an ``id:`` line only counts once its block is complete), ``retry``
    holds the last valid ``retry:`` value in milliseconds. Comments (``:`` lines, the server's
    keep-alives) and unknown fields are ignored; a block without ``data:`` dispatches nothing.
    """

    __slots__ = (
        "_data",
        "_event",
        "_id",
        "_pending",
        "_started",
        "_text",
        "_trailing_cr",
        "last_event_id",
        "retry",
    )

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._trailing_cr = False
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self.last_event_id: str | None = None
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        """Decode ``chunk`` and return the messages it completes (possibly none)."""
        text = self._text.decode(chunk)
        if not self._started and text:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if not text:
            return []
        if self._trailing_cr:
            # A CR ended the previous piece: a LF right here belongs to that line end.
            self._trailing_cr = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        if "\r" in text:
            self._trailing_cr = text.endswith("\r")
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        lines[0] = self._pending + lines[0]
        self._pending = lines.pop()
        out: list[SSEMessage] = []
        for line in lines:
            self._line(line, out)
        return out

    def _line(self, line: str, out: list[SSEMessage]) -> None:
        if not line:
            self.last_event_id = self._id
            if self._data:
                out.append(
                    SSEMessage("\n".join(self._data), self.last_event_id, self._event or "message")
                )
                self._data = []
            self._event = ""
            return
        name, colon, value = line.partition(":")
        if not colon:
            value = ""
        elif value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "event":
            self._event = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        # Comments (empty field name) and unknown fields are ignored.

    def close(self) -> bool:
        """End of stream: True if a message was left incomplete (and so is discarded)."""
        rest = self._pending + self._text.decode(b"", final=True)
        self._pending = ""
        return bool(self._data) or rest.startswith("data")
