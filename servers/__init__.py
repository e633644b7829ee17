"""The trio-jobs daemons (queen, hive, worker), the ``trio-jobs`` CLI and the demo.

How the pieces talk (every arrow is the job API of :mod:`trio_jobs.http`: ``POST /v1/jobs``
then the job's SSE stream, ``DELETE`` to cancel)::

    keeper (trio-jobs CLI) ──> queen ──> hive      worker_*/model_* operations
                                 │         └─ supervises worker processes (children)
                                 └──────> worker   infer, on a live worker of the model
    worker ── POST /v1/workers/heartbeat ──> queen (workers report to the queen directly)

- :mod:`servers.operations`: the operation contract (a pydantic union on ``operation``).
- :mod:`servers.queen`: routes operations, forwards to hives and workers re-narrating
  their events, schedules ``infer`` on live workers.
- :mod:`servers.hive`: worker processes and model downloads.
- :mod:`servers.worker`: ``infer`` with the tiny built-in generator or an OpenAI upstream.
- :mod:`servers.cli`: the ``trio-jobs`` console script (:mod:`servers._printer` shows
  streams); :mod:`servers.demo`: the demo.
"""
