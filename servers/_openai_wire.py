"""OpenAI wire shapes shared by the queen's OpenAI API and the worker's own chat route.

Chat messages as the ``infer`` operation carries them, how the tiny generator reads them
(:func:`render_messages`), the ``chat.completion.chunk`` / ``text_completion`` objects, the
error object (``{"error": {"message", "type", "param", "code"}}``) and their SSE framing.
Plain functions over dicts: the queen and the worker build the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from json.encoder import encode_basestring
from typing import Any

__all__ = [
    "DONE_FRAME",
    "TOKEN",
    "chat_chunk",
    "error_object",
    "frame_template",
    "message_text",
    "render_messages",
    "sse_frame",
    "text_chunk",
    "usage_object",
]

DONE_FRAME = b"data: [DONE]\n\n"
"""The last frame of a chat or completions stream that ended well (never after an error)."""

_TEXT_PARTS = ("text", "input_text", "output_text")
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def message_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the ``text`` of its text parts
    (``text``, ``input_text``, ``output_text``) joined; other parts are left out."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") in _TEXT_PARTS
        )
    return str(content)


def render_messages(messages: Iterable[Mapping[str, Any]]) -> str:
    """A chat as the tiny generator's prompt: the messages' texts, one per line.

    A lone user message renders to exactly its text, so a chat and a completion with
    the same text generate the same tokens.
    """
    return "\n".join(message_text(m.get("content")) for m in messages)


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Chat/completions ``usage``."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_chunk(
    chunk_id: str,
    created: int,
    model: str,
    delta: Mapping[str, Any] | None,
    finish_reason: str | None = None,
    *,
    usage: Mapping[str, int] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` makes the usage chunk (no choices).

    ``with_usage``: the request asked for usage, so every chunk carries ``usage`` (null
    until the last one), as OpenAI sends it.
    """
    data: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage or usage is not None:
        data["usage"] = dict(usage) if usage is not None else None
    return data


def text_chunk(
    chunk_id: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    *,
    usage: Mapping[str, int] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    """One streamed ``text_completion`` object; ``text=None`` makes the usage chunk."""
    data: dict[str, Any] = {
        "id": chunk_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if text is None
        else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage or usage is not None:
        data["usage"] = dict(usage) if usage is not None else None
    return data


def error_object(
    message: str,
    error_type: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def sse_frame(data: Any, event: str | None = None) -> bytes:
    """``data: <compact JSON>`` (after ``event: <name>`` when given) and the blank line."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {_dumps(data)}\n\n".encode()


_MARK = "\x00token\x00"


def frame_template(chunk: Mapping[str, Any], event: str | None = None) -> Callable[[str], bytes]:
    """A fast :func:`sse_frame` for chunks that differ only in one string: ``chunk``
    holds the placeholder :data:`TOKEN` where the string goes. The JSON around it is
    encoded once; each call only escapes the string (a stream writes one per token)."""
    marker = _dumps(_MARK)
    head, tail = sse_frame(chunk, event).decode().split(marker)
    head_b, tail_b = head.encode(), tail.encode()
    escape: Callable[[str], str] = encode_basestring

    def frame(text: str) -> bytes:
        return head_b + escape(text).encode() + tail_b

    return frame


TOKEN = _MARK
"""The placeholder of :func:`frame_template`."""
