"""Forwarding one queen job to another daemon's job and re-narrating what it says."""

from __future__ import annotations

import logging
import math
from typing import Any

import trio

from trio_jobs import (
    InvalidJobState,
    JobCancelled,
    JobClient,
    JobFailed,
    JobNotFound,
    JobRegistry,
    JobTimeout,
    NarrationEvent,
    StreamEndedWithoutSignal,
    TerminalSignal,
    TransportError,
    current_job_id,
    narrate,
    raise_for_signal,
)

__all__ = ["ForwardFailed", "forward_job"]

logger = logging.getLogger("servers.queen")


class ForwardFailed(Exception):
    """The forwarded job failed, or its daemon could not be reached; ``str`` says which.

    ``lost_contact`` is true when the daemon could not be reached or went away mid-job
    (as opposed to answering ``[ERROR]``).
    """

    def __init__(self, message: str, *, lost_contact: bool = False) -> None:
        super().__init__(message)
        self.lost_contact = lost_contact


async def forward_job(
    registry: JobRegistry,
    base_url: str,
    body: dict[str, Any],
    *,
    what: str,
    token: str | None = None,
    cancel_timeout_s: float = 3.0,
    max_reconnects: int = 2,
) -> str:
    """Run ``body`` as a job on the daemon at ``base_url`` as part of the current job.

    Each event of the remote job is narrated again into the current job (keeping its actor
    and fields). The remote outcome decides ours: ``[DONE]`` returns the remote job id,
    ``[ERROR] msg`` raises :class:`ForwardFailed` with the same message, ``[CANCELLED]``
    cancels the current job. The current job's remaining deadline is sent as the remote
    ``timeout_s``, so both enforce the same timeout, and ``on_disconnect: cancel``, so a
    queen that dies does not leave the remote job running.

    Cancellation: when the current job is cancelled (or times out) before the remote job
    ended, a ``DELETE`` of the remote job is sent in a shielded cleanup bounded by
    ``cancel_timeout_s``, then ``Cancelled`` propagates.
    """
    # The remote job belongs to this one: if the queen goes away (its stream drops for
    # good), the remote daemon cancels it instead of running it for nobody.
    options: dict[str, Any] = {"on_disconnect": "cancel"}
    deadline = trio.current_effective_deadline()
    if deadline != math.inf:
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            await trio.lowlevel.checkpoint()
        options["timeout_s"] = max(round(remaining, 3), 0.001)
    async with JobClient(
        base_url, token=token, timeout=5.0, max_reconnects=max_reconnects, backoff_s=0.1
    ) as client:
        # One request creates the remote job and opens its stream (a round trip less than
        # submit, then stream). If it drops before the job's id came back, the remote job
        # (on_disconnect: cancel) is cancelled by its daemon.
        terminal: TerminalSignal | None = None
        remote_id: str | None = None
        try:
            async with client.submit_stream(body, **options) as events:
                remote_id = events.job_id
                assert remote_id is not None
                narrate(
                    "forward",
                    f"Forwarded {body.get('operation')} to {what} as {remote_id}",
                    target=base_url,
                    remote_job_id=remote_id,
                )
                while terminal is None:
                    try:
                        item = await events.receive()
                    except trio.EndOfChannel:
                        break
                    # Re-narrate everything that already arrived without a trip through
                    # the scheduler per event (the batching lever in PITFALLS).
                    while True:
                        if isinstance(item, NarrationEvent):
                            narrate(item.action, item.human, actor=item.actor, **item.fields)
                        else:
                            terminal = item
                        try:
                            item = events.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                if terminal is not None:  # read to the end of the body (keeps the pool)
                    async for _ in events:
                        logger.warning("%s sent an item after its terminal signal", what)
        except StreamEndedWithoutSignal as exc:
            raise ForwardFailed(
                f"lost {what} at {base_url} before the job ended: {exc}", lost_contact=True
            ) from None
        except TransportError as exc:
            if remote_id is None:
                raise ForwardFailed(
                    f"{what} at {base_url} is unreachable: {exc}", lost_contact=True
                ) from None
            raise ForwardFailed(f"lost {what} at {base_url}: {exc}", lost_contact=True) from None
        finally:
            if terminal is None and remote_id is not None:
                await _cancel_remote(client, remote_id, what, cancel_timeout_s)
        assert remote_id is not None
        try:
            raise_for_signal(terminal, remote_id)
        except JobTimeout as exc:
            # Our own deadline is the same instant give or take the network: let it fire
            # so the queen job reports its own timeout; fail with the remote text otherwise.
            with trio.move_on_after(1.0):
                await trio.sleep_forever()
            raise ForwardFailed(exc.message) from None
        except JobFailed as exc:
            raise ForwardFailed(exc.message) from None
        except JobCancelled:
            job_id = current_job_id()
            narrate("forward_cancelled", f"{what} cancelled job {remote_id}")
            if job_id is not None and registry.cancel_job(job_id, f"cancelled on {what}"):
                await trio.sleep_forever()
            raise ForwardFailed(f"{what} cancelled job {remote_id}") from None
        return remote_id


async def _cancel_remote(client: JobClient, remote_id: str, what: str, timeout_s: float) -> None:
    """DELETE the remote job; shielded and bounded, failures only logged."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout_s) as scope:
        try:
            await client.cancel(remote_id)
            logger.info("cancelled %s job %s", what, remote_id)
            narrate("forward_cancel", f"Cancelled job {remote_id} on {what}")
        except (InvalidJobState, JobNotFound):
            logger.debug("%s job %s had already finished", what, remote_id)
        except TransportError as exc:
            logger.warning("could not cancel %s job %s: %s", what, remote_id, exc)
    if scope.cancelled_caught:
        logger.warning("cancelling %s job %s took over %.1fs", what, remote_id, timeout_s)
