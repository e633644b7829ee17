"""The shared-mode notices' wire form: split to fit PostgreSQL's payload limit, parsed back,
and event chunks sent along only for followed jobs and only when they fit."""

from __future__ import annotations

import time

from trio_jobs import JobRecord, JobState, NarrationEvent, Priority
from trio_jobs._stores._base import (
    JobWrite,
    WriteBatch,
    event_notices,
    notices,
    parse_notice,
    written_notices,
)
from trio_jobs._stores._rows import event_chunks, events_from_chunks


def _record(job_id: str, state: JobState = JobState.QUEUED) -> JobRecord:
    return JobRecord(job_id, state, None, {}, None, Priority.NORMAL, {}, None, 0, 0.0, None, None)


def test_notices_split_under_the_payload_limit_and_parse_back() -> None:
    ids = [f"job-{i:05d}-" + "x" * 40 for i in range(400)]
    parts = notices("c", ids)
    assert len(parts) > 1 and all(len(p.encode()) < 8000 for p in parts)
    assert [i for p in parts for i in parse_notice(p)[1]] == ids
    assert {parse_notice(p)[0] for p in parts} == {"c"}
    assert notices("f", []) == ["f"]


def test_a_written_batch_names_its_jobs_and_its_new_queued_ones() -> None:
    batch = WriteBatch(
        jobs=[JobWrite(_record("a"), first=True), JobWrite(_record("b", JobState.RUNNING))],
        events=[NarrationEvent(1, "c", time.time(), "w", "x", "y", {})],
    )
    assert written_notices(batch) == ["w a b c", "q a"]
    many = WriteBatch(jobs=[JobWrite(_record("j" * 60 + str(i))) for i in range(200)])
    assert written_notices(many) == ["w *"]


def test_event_chunks_travel_only_for_followed_jobs_and_when_they_fit() -> None:
    now = time.time()
    small = [NarrationEvent(i, "a", now, "w", "tick", f"tick {i}", {"i": i}) for i in (1, 2)]
    big = [NarrationEvent(1, "b", now, "w", "tick", "é" * 5000, {})]
    chunks = event_chunks([*small, *big])
    sent = event_notices(chunks, {"a", "b"})
    assert len(sent) == 1  # b's chunk is over 8000 bytes in UTF-8
    kind, job_id, chunk = sent[0].split(" ", 2)
    assert (kind, job_id) == ("e", "a")
    assert events_from_chunks("a", [chunk], 0, None) == small
    assert event_notices(chunks, {"c"}) == []
