"""The one JSON codec of the stores: compact, fast, and able to hold any Python text.

orjson is several times faster than the standard library (most of a flush's cost), but it
refuses strings holding lone surrogates, which Python text may carry (a narration built
from undecodable bytes, a JSON body with ``"\\ud800"``). Those values fall back to the
standard library with ``ensure_ascii``, whose ``\\uXXXX`` escapes read back exactly. NUL
and every other control character are escaped by both, so JSON text fits any store's
text column (PostgreSQL's cannot hold NUL).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["dumps", "dumps_lenient", "loads"]

_std_strict = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
_std_lenient = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=str).encode


def _codec() -> tuple[Callable[[Any], str], Callable[[Any], str], Callable[[str | bytes], Any]]:
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is a dependency
        return _std_strict, _std_lenient, json.loads
    options = orjson.OPT_NON_STR_KEYS
    fast = orjson.dumps

    def strict(value: Any) -> str:
        try:
            return fast(value, option=options).decode()
        except TypeError as exc:
            if "surrogates" not in str(exc):
                raise
            return _std_strict(value)

    def lenient(value: Any) -> str:
        try:
            return fast(value, default=str, option=options).decode()
        except TypeError as exc:
            if "surrogates" not in str(exc):
                raise
            return _std_lenient(value)

    def load(text: str | bytes) -> Any:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            # ``\\ud800`` escapes (written by the fallback above) are valid JSON that
            # orjson will not decode into a str.
            return json.loads(text)

    return strict, lenient, load


dumps, dumps_lenient, loads = _codec()
"""``dumps``: compact JSON, raising ``TypeError`` for what JSON cannot hold (payloads,
metadata); ``dumps_lenient``: the same with ``str(value)`` for those (event fields, as on
the wire); ``loads``: reads either back."""
