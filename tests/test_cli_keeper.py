"""The keeper's job options, ``--json`` lines and pipes, as real processes against a real
queen, hive and (slow) worker on 127.0.0.1.

A pipe is a real one: ``| head -n 5`` runs in ``sh``, ``| tee`` shares the keeper's
process group and gets the same SIGINT, as with Ctrl-C in a terminal. Every test that
starts a job on the slow worker waits until the cluster is idle again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from servers.cli import build_parser, main
from tests.daemons import Cluster, closed_port, spawn_worker, wait_idle
from trio_jobs._client import JobClient

KEEPER = [sys.executable, "-m", "servers"]


@dataclass
class Env:
    queen: str
    hive: str
    slow_url: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A queen (in memory, ``infer`` waits 5 s for a worker), a hive and one slow worker
    (0.05 s per token)."""
    root = tmp_path_factory.mktemp("keeper")
    cluster = Cluster(root)
    try:
        queen = cluster.start(
            "queen", ["queen", "--port", "0", "--store", "memory", "--schedule-wait", "5"]
        )
        hive = cluster.start(
            "hive",
            [
                *("hive", "--port", "0", "--store", "memory", "--models-dir", str(root / "m")),
                *("--queen", queen, "--heartbeat-s", "0.3"),
            ],
        )

        async def setup() -> str:
            with trio.fail_after(20):
                async with JobClient(queen) as client:
                    while not any(
                        "hive localhost" in line and "up" in line
                        for line in (await keeper_run(queen, "status"))[1].splitlines()
                    ):
                        await trio.sleep(0.05)
                    worker = await spawn_worker(client, "slow", token_delay_s=0.05)
            return str(worker["url"])

        yield Env(queen, hive, trio.run(setup))
    finally:
        codes = cluster.close()
    assert codes == {"queen": 0, "hive": 0}


async def keeper_run(queen: str, *args: str, timeout: float = 20) -> tuple[int, str, str]:
    """``python -m servers --queen URL args``: (exit code, stdout, stderr)."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            [*KEEPER, "--queen", queen, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def _job_count(queen: str) -> int:
    return len(httpx.get(f"{queen}/v1/jobs", timeout=5).json()["jobs"])


async def _state_soon(queen: str, job_id: str, state: str, within_s: float = 5.0) -> None:
    """Wait until the queen reports ``job_id`` in ``state``."""
    async with JobClient(queen) as client:
        with trio.move_on_after(within_s):
            while (await client.get(job_id))["state"] != state:
                await trio.sleep(0.02)
        assert (await client.get(job_id))["state"] == state


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr


# ---- job options ----------------------------------------------------------------------------


async def test_submit_takes_the_job_options_the_http_post_takes(env: Env) -> None:
    """The body's options (as ``POST /v1/jobs`` takes them) and the flags on top of them."""
    body = {
        "operation": "status",
        "tags": {"team": "ml", "run": "1"},
        "metadata": {"from": "body"},
        "on_disconnect": "cancel",
        "timeout_s": 30,
    }
    code, out, err = await keeper_run(
        env.queen,
        *("--json", "submit", json.dumps(body), "--tag", "run=2", "--priority", "high"),
        *("--retry", "max_attempts=4,backoff_base=0.5,retry_timeouts=true", "--expires", "60"),
    )
    assert code == 0, err
    done = json.loads(out.splitlines()[-1])
    assert done["signal"] == "DONE"
    async with JobClient(env.queen) as client:
        record = await client.get(done["job_id"])
    assert record["tags"] == {"team": "ml", "run": "2"}
    assert record["metadata"] == {"from": "body"}
    assert (record["priority"], record["timeout_s"]) == ("high", 30)
    assert record["retry"]["max_attempts"] == 4
    assert record["retry"]["backoff_base"] == 0.5
    assert record["retry"]["retry_timeouts"] is True
    assert record["payload"] == {"operation": "status"}


async def test_every_submitting_command_takes_the_job_option_flags(env: Env) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    submitting = {
        name: command
        for name, command in sub.choices.items()  # type: ignore[union-attr]
        if command.get_default("build") is not None
    }
    assert {"infer", "submit", "status", "model-download", "worker-spawn"} <= set(submitting)
    flags = ("--timeout", "--retry", "--tag", "--priority", "--on-disconnect", "--expires")
    for name, command in submitting.items():
        known = {s for action in command._actions for s in action.option_strings}
        assert set(flags) | {"--metadata"} <= known, name
    args = parser.parse_args(
        ["infer", "hi", "--tag", "a=1", "--tag", "b=x=y", "--retry", "3", "--timeout", "9"]
    )
    assert (args.tags, args.retry, args.timeout_s) == (
        {"a": "1", "b": "x=y"},
        {"max_attempts": 3},
        9,
    )
    code, out, err = await keeper_run(
        env.queen, "--json", "infer", "tagged", "--model", "slow", "--max-tokens", "2",
        "--tag", "who=keeper", "--priority", "critical", "--retry", "2", "--timeout", "20",
    )  # fmt: skip
    assert code == 0, err
    job_id = json.loads(out.splitlines()[-1])["job_id"]
    async with JobClient(env.queen) as client:
        record = await client.get(job_id)
    assert record["tags"] == {"who": "keeper"}
    assert (record["priority"], record["timeout_s"], record["retry"]["max_attempts"]) == (
        "critical",
        20,
        2,
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["status", "--timeout", "-1"], "timeout_s (--timeout): Input should be greater than 0"),
        (["status", "--timeout", "inf"], "timeout_s (--timeout)"),
        (["status", "--retry", "0"], "retry.max_attempts (--retry)"),
        (["status", "--retry", "max_attempts=2,backof=1"], "retry.backof (--retry): Extra inputs"),
        (["status", "--expires", "0"], "expires_s (--expires)"),
        (["submit", '{"operation": "status", "tags": {"a": 1}}'], "tags.a (--tag)"),
        (["submit", '{"operation": "status", "priority": "urgent"}'], "priority (--priority)"),
        (["submit", '{"operation": "status", "on_disconnect": "x"}'], "on_disconnect"),
        (["submit", '{"operation": "status", "bogus": 1}'], "invalid operation: status.bogus"),
    ],
)
def test_bad_job_options_exit_2_and_submit_nothing(
    env: Env, argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """(In this process, to keep it fast: ``main`` is the console script.)"""
    before = _job_count(env.queen)
    assert main(["--queen", env.queen, *argv]) == 2
    out = capsys.readouterr().out
    assert out.startswith("[ERROR] ") and says in out, out
    assert _job_count(env.queen) == before


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["status", "--tag", "novalue"], "--tag wants key=value, got 'novalue'"),
        (["status", "--on-disconnect", "never"], "invalid choice: 'never'"),
        (["status", "--metadata", "{broken"], "not JSON"),
        (["status", "--retry", "many"], "--retry: want N, key=value"),
        (["--priority", "high", "jobs"], "--priority: only for commands that submit a job"),
        (["submit", "[1]"], "the body must be a JSON object"),
    ],
)
def test_bad_flags_are_usage_errors(
    env: Env, argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _job_count(env.queen)
    with pytest.raises(SystemExit) as exit_:
        main(["--queen", env.queen, *argv])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and says in err, err
    assert _job_count(env.queen) == before


# ---- --json ---------------------------------------------------------------------------------


async def test_json_mode_prints_only_json_lines(env: Env) -> None:
    """Events, the terminal signal, and the keeper's own errors: each line parses."""
    argvs = {
        "done": (env.queen, "status"),
        "error": (env.queen, "worker-get", "worker-nope"),
        "usage": (env.queen, "status", "--timeout", "-1"),
        "unreachable": (f"http://127.0.0.1:{closed_port()}", "status"),
        "detach": (env.queen, "--detach", "status"),
    }
    runs: dict[str, tuple[int, str, str]] = {}

    async def run(name: str, argv: tuple[str, ...]) -> None:
        runs[name] = await keeper_run(argv[0], "--json", *argv[1:])

    async with trio.open_nursery() as nursery:
        for name, argv in argvs.items():
            nursery.start_soon(run, name, argv)
    lines = {name: [json.loads(x) for x in out.splitlines()] for name, (_, out, _) in runs.items()}
    assert all(lines.values())
    done = lines["done"][-1]
    assert done == {"signal": "DONE", "job_id": lines["done"][0]["job_id"]}
    assert any(e.get("action") == "status" for e in lines["done"])
    error = lines["error"][-1]
    assert (error["signal"], runs["error"][0]) == ("ERROR", 1)
    assert error["message"].startswith("unknown worker 'worker-nope'")
    assert lines["usage"] == [
        {
            "signal": "ERROR",
            "message": "invalid job options: timeout_s (--timeout): Input should be greater than 0",
        }
    ]
    assert lines["unreachable"][0]["signal"] == "ERROR"
    assert lines["detach"][0]["job_id"].startswith("job-")


# ---- pipes ----------------------------------------------------------------------------------


async def test_head_closing_the_pipe_cancels_the_job(env: Env, tmp_path: Path) -> None:
    """``trio-jobs --json infer ... | head -n 5``: once ``head`` has its lines the keeper's
    next write fails (EPIPE); it cancels the job on the server and exits 141, quietly.

    Five lines, not three: the fourth says the queen has forwarded the job to the worker.
    A cancel that lands while that request is in flight leaves the worker's job running
    (the queen does not know its id yet): a queen-side race, not the keeper's."""
    err_file, code_file = tmp_path / "err", tmp_path / "code"
    argv = [*KEEPER, "--queen", env.queen, "--json", "infer", "x", "--model", "slow"]
    keeper = " ".join([*argv, "--max-tokens", "2000"])
    script = f'{{ {keeper} 2>"{err_file}"; echo $? >"{code_file}"; }} | head -n 5'
    with trio.fail_after(20):
        result = await trio.run_process(["sh", "-c", script], capture_stdout=True, check=False)
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(lines) == 5
    assert lines[3]["action"] == "forward"
    job_id = lines[0]["job_id"]
    assert code_file.read_text().strip() == "141"
    _no_traceback(err_file.read_text())
    await _state_soon(env.queen, job_id, "cancelled")
    await wait_idle(env.queen, env.hive, env.slow_url)


async def test_a_closed_pipe_is_noticed_while_the_job_is_quiet(env: Env) -> None:
    """The reader goes away while the job writes nothing (``infer`` waiting for a worker of
    a model nobody serves): the keeper notices anyway and cancels the job at once."""
    read_end, write_end = os.pipe()
    try:
        process = await trio.lowlevel.open_process(
            [*KEEPER, "--queen", env.queen, "--json", "infer", "x", "--model", "nobody"],
            stdout=write_end,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    with trio.fail_after(10):
        first = b""
        while b'"infer_schedule"' not in first:
            chunk = await trio.to_thread.run_sync(os.read, read_end, 65536)
            assert chunk, "keeper ended early"
            first += chunk
        job_id = json.loads(first.split(b"\n", 1)[0])["job_id"]
        os.close(read_end)
        started = trio.current_time()
        code = await process.wait()
        took = trio.current_time() - started
        assert process.stderr is not None
        err = bytearray()
        while data := await process.stderr.receive_some(65536):
            err += data
        await process.stderr.aclose()
    assert code == 141
    assert took < 2.0  # the queen would fail it only after --schedule-wait 5
    _no_traceback(err.decode())
    await _state_soon(env.queen, job_id, "cancelled")


async def test_ctrl_c_on_a_piped_keeper_cancels_the_job_and_exits_130(
    env: Env, tmp_path: Path
) -> None:
    """``trio-jobs infer ... | tee log`` and Ctrl-C: SIGINT reaches both; ``tee`` dies and
    breaks the keeper's pipe; the keeper still cancels the job and exits 130."""
    log = tmp_path / "log"
    read_end, write_end = os.pipe()
    try:
        keeper = await trio.lowlevel.open_process(
            [
                *KEEPER,
                "--queen",
                env.queen,
                "infer",
                "x",
                "--model",
                "slow",
                "--max-tokens",
                "2000",
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            process_group=0,
        )
        tee = await trio.lowlevel.open_process(
            ["tee", str(log)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            process_group=keeper.pid,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    try:
        with trio.fail_after(15):
            while not log.exists() or (text := log.read_text()).endswith("\n") or not text:
                await trio.sleep(0.05)  # until tokens are being written
            os.killpg(keeper.pid, signal.SIGINT)
            code = await keeper.wait()
            await tee.wait()
            assert keeper.stderr is not None
            err = b""
            while chunk := await keeper.stderr.receive_some(65536):
                err += chunk
    finally:
        for process in (keeper, tee):
            if process.returncode is None:
                process.kill()
            await process.wait()
        if keeper.stderr is not None:
            await keeper.stderr.aclose()
    text = err.decode()
    assert code == 130, text
    _no_traceback(text)
    job_id = text.split("job ", 1)[1].split()[0]
    assert f"cancelled job {job_id} on the server" in text
    await _state_soon(env.queen, job_id, "cancelled")
    await wait_idle(env.queen, env.hive, env.slow_url)
