"""Property tests of the HTTP layer: POST bodies never produce a 500 and bad ones change
nothing; the fast wire encoder writes exactly ``NarrationEvent.wire``.

The fuzzed server is one real hypercorn server on 127.0.0.1 port 0, run by its own
``trio.run`` in a thread for the whole module; hypothesis drives a sync httpx client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, TypeAdapter

from trio_jobs import JobRegistry, NarrationEvent, narrate
from trio_jobs.http import WireEncoder, create_app

from .helpers import serving_in_a_thread


class Sleep(BaseModel):
    operation: Literal["sleep"]
    seconds: Annotated[float, Field(ge=0, le=0.01)]


class Echo(BaseModel):
    operation: Literal["echo"]
    text: Annotated[str, Field(max_length=100)]


_OPERATION: TypeAdapter[Sleep | Echo] = TypeAdapter(
    Annotated[Sleep | Echo, Field(discriminator="operation")]
)


def parse_payload(body: dict[str, Any]) -> Any:
    return _OPERATION.validate_python(body).model_dump()


async def executor(job_id: str, payload: Any) -> None:
    narrate(payload["operation"], "fuzzed job")


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[str, JobRegistry]]:
    registry = JobRegistry()
    app = create_app(registry, executor, parse_payload=parse_payload, max_body_bytes=4096)
    with serving_in_a_thread(app) as url:
        yield url, registry


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_option_values = {
    "timeout_s": _json_leaf | st.floats(min_value=0.001, max_value=100),
    "priority": st.sampled_from(["low", "normal", "high", "critical", "urgent", ""]) | _json_leaf,
    "retry": _json
    | st.fixed_dictionaries({}, optional={"max_attempts": _json_leaf, "jitter": _json_leaf}),
    "tags": _json | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    "metadata": _json,
    "on_disconnect": st.sampled_from(["detach", "cancel", "x"]) | _json_leaf,
    "expires_s": _json_leaf,
    "operation": st.sampled_from(["sleep", "echo", "nope"]) | _json_leaf,
    "seconds": _json_leaf,
    "text": _json_leaf,
}
_bodies = st.one_of(
    st.fixed_dictionaries({}, optional=_option_values).map(json.dumps).map(str.encode),
    _json.map(json.dumps).map(str.encode),
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just(b"{" * 5000),
    st.just(b'{"operation": "echo", "text": "' + b"x" * 5000 + b'"}'),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=_bodies, content_type=st.sampled_from(["application/json", "text/plain", None]))
def test_post_bodies_never_500_and_bad_ones_create_nothing(
    fuzz_server: tuple[str, JobRegistry], body: bytes, content_type: str | None
) -> None:
    url, registry = fuzz_server
    headers = {"Content-Type": content_type} if content_type else {}
    before = len(registry)
    with httpx.Client(base_url=url, timeout=10) as client:
        response = client.post("/v1/jobs", content=body, headers=headers)
    assert response.status_code in {201, 400, 413, 415, 422}, response.text
    assert (response.status_code == 415) == (content_type != "application/json")
    data = response.json()
    if response.status_code == 201:
        assert data["job_id"].startswith("job-")
    else:
        assert set(data) == {"error", "detail"}
        assert len(registry) == before


@settings(max_examples=300, deadline=None)
@given(
    ts=st.floats(min_value=0, max_value=4e9, allow_nan=False)
    | st.integers(min_value=0, max_value=4 * 10**9).map(float),
    text=st.text(max_size=10),
    fields=st.dictionaries(
        st.sampled_from(["seq", "id", "x", "é", "ts"]) | st.text(max_size=3), _json, max_size=3
    ),
)
def test_wire_encoder_matches_event_wire(ts: float, text: str, fields: dict[str, Any]) -> None:
    event = NarrationEvent(7, f"job-{text}", ts, text or "actor", text, text, fields)
    encoder = WireEncoder()
    assert encoder.event_json(event) == event.wire
    assert encoder.event_json(event) == event.wire  # with warm caches too
    assert encoder.sse([event]) == f"id: 7\ndata: {event.wire}\n\n"
