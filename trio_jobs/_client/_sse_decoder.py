"""An incremental ``text/event-stream`` decoder (WHATWG HTML, "Server-sent events" §9.2.6).

httpx-sse hands out one event per async-generator step and dispatches blocks that carry no
data (our ``retry:`` preamble would come out as an empty event). This decoder takes whatever
bytes arrived and returns every complete message in them at once, so a client can drain a
whole network chunk without a scheduler trip per event (the speed lever in PITFALLS).
"""

from __future__ import annotations

import codecs
from typing import NamedTuple

__all__ = ["SSEDecoder", "SSEMessage"]


class SSEMessage(NamedTuple):
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
        data = self._data
        for line in lines:
            # Fast paths for what a job server sends; everything else goes by the spec.
            if line[:6] == "data: ":
                data.append(line[6:])
            elif not line:
                self.last_event_id = self._id
                if data:
                    text = data[0] if len(data) == 1 else "\n".join(data)
                    if text:  # the spec dispatches nothing for empty data
                        out.append(SSEMessage(text, self._id, self._event or "message"))
                    data = self._data = []
                self._event = ""
            elif line[:4] == "id: ":
                if "\0" not in line:
                    self._id = line[4:]
            else:
                self._field(line)
        return out

    def _field(self, line: str) -> None:
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
