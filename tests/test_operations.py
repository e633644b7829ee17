"""The operation contract: tags, defaults, forwarding, and errors that name the field."""

from __future__ import annotations

import contextlib
import copy
import json
import pickle
from typing import Any

import pytest
from pydantic import ValidationError

from servers.operations import (
    MODEL_ID_PATTERN,
    Infer,
    ModelDownload,
    Status,
    WorkerSpawn,
    operation_names,
    operation_schema,
    parse_operation,
)
from servers.worker import tiny_tokens

REFERENCE_TAGS = {
    "status",
    "ssh_test",
    "hive_install",
    "hive_uninstall",
    "hive_start",
    "hive_stop",
    "hive_list",
    "hive_get",
    "hive_status",
    "hive_refresh_capabilities",
    "hive_import_ssh",
    "worker_spawn",
    "worker_list",
    "worker_get",
    "worker_delete",
    "model_download",
    "model_list",
    "model_get",
    "model_delete",
    "infer",
}

MINIMAL: dict[str, dict[str, Any]] = {
    "ssh_test": {"alias": "h"},
    "hive_install": {"alias": "h"},
    "hive_uninstall": {"alias": "h"},
    "hive_import_ssh": {"ssh_config_path": "~/.ssh/config"},
    "worker_spawn": {"model": "tiny"},
    "worker_get": {"id": "w"},
    "worker_delete": {"id": "w"},
    "model_download": {"model": "m.gguf"},
    "model_get": {"id": "m.gguf"},
    "model_delete": {"id": "m.gguf"},
    "infer": {"model": "tiny", "prompt": "hi"},
}


def _locs(exc: ValidationError) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in exc.errors()]


def test_every_reference_operation_is_in_the_union() -> None:
    assert set(operation_names()) == REFERENCE_TAGS


@pytest.mark.parametrize("tag", sorted(REFERENCE_TAGS))
def test_round_trip(tag: str) -> None:
    body = {"operation": tag, **MINIMAL.get(tag, {})}
    op = parse_operation(body)
    assert op.operation == tag
    again = parse_operation(op.to_body())
    assert again == op


@pytest.mark.parametrize("tag", sorted(REFERENCE_TAGS))
def test_forwarding_rule(tag: str) -> None:
    op = parse_operation({"operation": tag, **MINIMAL.get(tag, {})})
    assert op.should_forward_to_hive() == tag.startswith(("worker_", "model_"))


def test_infer_fields_and_defaults() -> None:
    op = parse_operation(
        {
            "operation": "infer",
            "model": "tiny",
            "prompt": "hello",
            "max_tokens": 5,
            "temperature": 0.0,
            "top_p": 0.9,
            "top_k": 3,
        }
    )
    assert isinstance(op, Infer)
    assert (op.max_tokens, op.temperature, op.top_p, op.top_k) == (5, 0.0, 0.9, 3)
    default = parse_operation({"operation": "infer", "model": "m", "prompt": ""})
    assert isinstance(default, Infer)
    assert default.max_tokens == 32 and default.hive_id is None


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"operation": "infer", "model": "m"}, ("infer", "prompt")),
        (
            {"operation": "infer", "model": "m", "prompt": "p", "max_tokens": 0},
            ("infer", "max_tokens"),
        ),
        ({"operation": "infer", "model": "m", "prompt": "p", "top_p": 2}, ("infer", "top_p")),
        (
            {"operation": "infer", "model": "m", "prompt": "p", "temperature": -1},
            ("infer", "temperature"),
        ),
        ({"operation": "infer", "model": "m", "prompt": "p", "promt": "x"}, ("infer", "promt")),
        ({"operation": "worker_spawn"}, ("worker_spawn", "model")),
        ({"operation": "worker_get", "hive_id": "h"}, ("worker_get", "id")),
        ({"operation": "model_download", "model": "../etc/passwd"}, ("model_download", "model")),
        (
            {"operation": "model_download", "model": "m", "sha256": "xyz"},
            ("model_download", "sha256"),
        ),
        (
            {"operation": "model_download", "model": "m", "url": "ftp://x"},
            ("model_download", "url"),
        ),
        ({"operation": "worker_spawn", "model": "m", "backend": "openai"}, ("worker_spawn",)),
        ({"operation": "nope"}, ("operation",)),
        ({"model": "m"}, ("operation",)),
    ],
)
def test_errors_name_the_field(body: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        parse_operation(body)
    assert loc in _locs(info.value)


def test_unknown_tag_lists_the_known_ones() -> None:
    with pytest.raises(ValidationError) as info:
        parse_operation({"operation": "hive_launch"})
    message = info.value.errors()[0]["msg"]
    assert "unknown operation 'hive_launch'" in message
    assert "worker_spawn" in message


def test_parse_accepts_a_parsed_operation() -> None:
    op = Status()
    assert parse_operation(op) is op


def test_to_body_omits_unset_optionals() -> None:
    assert WorkerSpawn(model="tiny").to_body() == {
        "operation": "worker_spawn",
        "hive_id": "localhost",
        "model": "tiny",
        "worker": "cpu",
        "device": 0,
        "backend": "tiny",
    }
    assert "sha256" not in ModelDownload(model="a").to_body()


def test_a_body_from_to_body_parses_back_to_its_operation_without_validation() -> None:
    op = Infer(model="tiny", prompt="hi", messages=[{"role": "user", "content": "hi"}])
    body = op.to_body()
    assert type(body) is not dict and isinstance(body, dict)
    assert parse_operation(body) is op
    assert json.dumps(body) == json.dumps(dict(body))
    for copied in (copy.copy(body), copy.deepcopy(body), pickle.loads(pickle.dumps(body))):
        assert type(copied) is dict and copied == body
        assert parse_operation(copied) == op and parse_operation(copied) is not op


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.__setitem__("max_tokens", 0),
        lambda b: b.update(max_tokens=0),
        lambda b: b.__ior__({"max_tokens": 0}),
        lambda b: b.setdefault("hive_id", 0),
        lambda b: b.pop("model"),
        lambda b: b.__delitem__("model"),
        lambda b: b.popitem(),
        lambda b: b.clear(),
    ],
)
def test_a_changed_body_forgets_its_operation(change: Any) -> None:
    op = Infer(model="tiny", prompt="hi", seed=3)
    body = op.to_body()
    change(body)
    assert body.operation is None  # type: ignore[attr-defined]
    with contextlib.suppress(ValidationError):  # some changes make it invalid
        assert parse_operation(body) is not op
    body = op.to_body()
    body["max_tokens"] = 0
    with pytest.raises(ValidationError):
        parse_operation(body)


def test_tiny_generator_is_deterministic_and_honours_options() -> None:
    def run(**kw: Any) -> list[str]:
        args: dict[str, Any] = {"max_tokens": 12, **kw}
        return list(tiny_tokens("tiny", "hello world", **args))

    first = run()
    assert len(first) == 12
    assert run() == first
    assert len(run(max_tokens=3)) == 3
    assert run(seed=1) != run(seed=2)
    assert list(tiny_tokens("tiny", "another prompt", max_tokens=12)) != first
    greedy = run(temperature=0.0)
    assert greedy == run(temperature=0.0, seed=99)  # greedy ignores the random seed
    assert run(top_k=1) == greedy  # top_k=1 is greedy
    assert run(top_p=1e-9) == greedy  # a tiny nucleus keeps only the best token
    assert first[0][0].isupper() and all(t.startswith(" ") for t in first[1:])


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", True), ("max_tokens", "5"), ("temperature", "0.5"), ("max_tokens", 2.5)],
)
def test_validation_is_as_strict_as_the_schema(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        parse_operation({"operation": "infer", "model": "m", "prompt": "p", field: value})
    assert info.value.errors()[0]["loc"][-1] == field


def test_integral_floats_are_integers_as_in_json_schema() -> None:
    op = parse_operation({"operation": "infer", "model": "m", "prompt": "p", "max_tokens": 8.0})
    assert isinstance(op, Infer) and op.max_tokens == 8 and type(op.max_tokens) is int
    spawn = parse_operation({"operation": "worker_spawn", "model": "m", "device": 1.0})
    assert isinstance(spawn, WorkerSpawn) and spawn.device == 1


def test_the_schema_says_what_validation_checks() -> None:
    schema = operation_schema()
    defs = schema["$defs"]
    assert all(
        d["required"][0] == "operation"
        for d in defs.values()
        if "operation" in d.get("properties", {})
    )
    spawn = defs["WorkerSpawn"]
    assert spawn["if"]["properties"]["backend"] == {"const": "openai"}
    assert spawn["then"]["required"] == ["upstream_url"]
    assert defs["ModelDownload"]["properties"]["model"]["pattern"] == MODEL_ID_PATTERN
    assert defs["Infer"]["properties"]["seed"]["anyOf"][0]["maximum"] == 2**63 - 1


@pytest.mark.parametrize("background", [False, True])
def test_an_infer_body_names_background_only_when_set(background: bool) -> None:
    op = Infer(model="tiny", prompt="hi", background=background)
    body = op.to_body()
    assert ("background" in body) is background
    assert parse_operation(body) is op  # remembered, not validated again
    assert parse_operation(dict(body)) == op
