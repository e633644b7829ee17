"""The ``trio-jobs`` keeper as a real process against a real queen, hive and worker.

Checks the exit codes (0 ``[DONE]``, 1 ``[ERROR]``/``[CANCELLED]``/timeout, 130 after an
interrupt that cancelled the job on the server), live output, ``--json`` lines, and that
SSH operations end with a clear line instead of hanging.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from servers.cli import Printer
from servers.queen import hives_from_config, load_config_file, parse_hive_flag
from servers.worker import tiny_tokens
from tests.daemons import Cluster, closed_port, spawn_worker, wait_idle
from trio_jobs import NarrationEvent, Signal, TerminalSignal
from trio_jobs._client import JobClient


@dataclass
class Env:
    queen: str
    hive: str
    slow_url: str
    token: str


TOKEN = "cli-test-token"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A queen started first (knowing only the ``ghost`` hive) with a token; the hive is
    started with ``--queen`` and registers itself as ``localhost``. Every hop carries the
    token: keeper -> queen, hive -> queen, queen -> hive, worker heartbeats -> queen."""
    root = tmp_path_factory.mktemp("cli")
    cluster = Cluster(root)
    try:
        ghost = f"http://127.0.0.1:{closed_port()}"
        queen = cluster.start(
            "queen",
            [
                *("queen", "--port", "0", "--token", TOKEN),
                *("--hive", f"ghost={ghost}", "--schedule-wait", "3"),
            ],
        )
        hive = cluster.start(
            "hive",
            [
                *("hive", "--port", "0", "--models-dir", str(root / "m")),
                *("--queen", queen, "--token", TOKEN, "--heartbeat-s", "0.3"),
            ],
        )

        async def setup() -> str:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            with trio.fail_after(15):
                async with httpx.AsyncClient(headers=headers) as http:
                    while True:  # the hive registers right after it starts listening
                        hives = (await http.get(f"{queen}/v1/hives")).json()["hives"]
                        if any(h["url"] == hive for h in hives):
                            break
                        await trio.sleep(0.05)
                found: dict[str, Any] = {}

                async def spawn(client: JobClient, model: str, delay: float | None) -> None:
                    found[model] = await spawn_worker(client, model, token_delay_s=delay)

                async with JobClient(queen, token=TOKEN) as client, trio.open_nursery() as n:
                    n.start_soon(spawn, client, "tiny", None)
                    n.start_soon(spawn, client, "slow", 0.05)
            return str(found["slow"]["url"])

        slow_url = trio.run(setup)
        yield Env(queen, hive, slow_url, TOKEN)
    finally:
        codes = cluster.close()
    assert codes == {"queen": 0, "hive": 0}


async def keeper(env: Env | None, *args: str, timeout: float = 20) -> tuple[int, str, str]:
    """Run ``python -m servers [--queen URL --token T] args``: (exit code, stdout, stderr)."""
    argv = [sys.executable, "-m", "servers"]
    if env is not None:
        argv += ["--queen", env.queen, "--token", env.token]
    with trio.fail_after(timeout):
        result = await trio.run_process(
            [*argv, *args], capture_stdout=True, capture_stderr=True, check=False
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_a_token_is_required(env: Env) -> None:
    code, out, _ = await keeper(None, "--queen", env.queen, "model-list")
    assert code == 1
    assert out.startswith("[ERROR] the queen refused the job: HTTP 401")


async def test_infer_prints_tokens_and_exits_zero(env: Env) -> None:
    code, out, err = await keeper(env, "infer", "hello keeper", "--max-tokens", "6")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-1] == "[DONE]"
    text = "".join(tiny_tokens("tiny", "hello keeper", max_tokens=6))
    assert text in lines
    assert any(line.startswith("[queen] Scheduled to worker") for line in lines)
    assert "job job-" in err


async def test_json_lines(env: Env) -> None:
    args = ("--json", "infer", "--prompt", "p", "--max-tokens", "3", "--hive", "localhost")
    code, out, _ = await keeper(env, *args)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    events = lines[:-1]
    assert lines[-1] == {"signal": "DONE", "job_id": events[0]["job_id"]}
    tokens = [e["token"] for e in events if e["action"] == "token"]
    assert tokens == list(tiny_tokens("tiny", "p", max_tokens=3))
    assert len({e["job_id"] for e in events}) == 1


async def test_options_after_the_subcommand(env: Env) -> None:
    args = ("status", "--queen", env.queen, "--token", env.token, "--json")
    code, out, _ = await keeper(None, *args)
    assert code == 0
    events = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    status = next(e for e in events if e["action"] == "status")
    assert {h["alias"] for h in status["hives"]} == {"localhost", "ghost"}


async def test_failure_exits_one_with_the_error_line(env: Env) -> None:
    code, out, _ = await keeper(env, "worker-get", "worker-nope")
    assert code == 1
    assert out.splitlines()[-1].startswith("[ERROR] unknown worker 'worker-nope'")


async def test_timeout_exits_one(env: Env) -> None:
    code, out, _ = await keeper(
        env, "--timeout", "1", "infer", "x", "--model", "slow", "--max-tokens", "2000"
    )
    assert code == 1
    assert out.splitlines()[-1] == "[ERROR] Job timed out after 1s"
    await wait_idle(env.queen, env.hive, env.slow_url, token=env.token)


async def test_interrupt_cancels_on_the_server_and_exits_130(env: Env) -> None:
    argv = [sys.executable, "-m", "servers", "--queen", env.queen, "--token", env.token, "--json"]
    argv += ["infer", "x", "--model", "slow", "--max-tokens", "2000"]
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(15):
            while buffer.count(b'"action":"token"') < 2:
                chunk = await process.stdout.receive_some(65536)
                assert chunk, "keeper ended early"
                buffer += chunk
            job_id = json.loads(buffer.split(b"\n", 1)[0])["job_id"]
            process.send_signal(signal.SIGINT)
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    assert code == 130
    async with JobClient(env.queen, token=env.token) as client:
        assert (await client.get(job_id))["state"] == "cancelled"
    with trio.fail_after(10):
        await wait_idle(env.queen, env.hive, env.slow_url, token=env.token)


async def test_unreachable_queen(env: Env) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    code, out, _ = await keeper(None, "--queen", url, "status")
    assert code == 1
    assert out.startswith(f"[ERROR] cannot reach the queen at {url}")


async def test_invalid_operation_is_a_usage_error(env: Env) -> None:
    code, out, _ = await keeper(env, "submit", '{"operation": "infer", "model": "tiny"}')
    assert code == 2
    assert out.startswith("[ERROR] invalid operation: infer.prompt: Field required")


async def test_submit_raw_operation(env: Env, tmp_path: Path) -> None:
    body = tmp_path / "op.json"
    body.write_text(json.dumps({"operation": "hive_list"}))
    code, out, _ = await keeper(env, "submit", f"@{body}")
    assert code == 0
    assert "2 hive(s)" in out


async def test_jobs_and_cancel_of_a_finished_job(env: Env) -> None:
    code, out, _ = await keeper(env, "--json", "jobs", "--state", "completed")
    assert code == 0
    jobs: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    assert jobs and all(j["state"] == "completed" for j in jobs)
    results: dict[str, tuple[int, str, str]] = {}

    async def cancel(job_id: str) -> None:
        results[job_id] = await keeper(env, "cancel", job_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel, jobs[0]["job_id"])
        nursery.start_soon(cancel, "job-unknown")
    code, out, _ = results[jobs[0]["job_id"]]
    assert code == 1
    assert "already finished" in out
    code, out, _ = results["job-unknown"]
    assert code == 1
    assert "unknown job job-unknown" in out


async def test_ssh_operations_answer_and_never_hang(env: Env) -> None:
    results: dict[str, tuple[int, str, str]] = {}

    async def run(command: str) -> None:
        results[command] = await keeper(env, command, "ghost", timeout=30)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "hive-install")
        nursery.start_soon(run, "ssh-test")
    code, out, _ = results["hive-install"]
    assert code == 1
    assert out.splitlines()[-1].startswith("[ERROR] not supported: hive_install")
    # ssh to the ghost hive's host: whatever the machine has (no client, no server, a
    # refusal), the answer is a terminal line within the ssh timeout.
    code, out, _ = results["ssh-test"]
    last = out.splitlines()[-1]
    assert (code, last) == (0, "[DONE]") or (code == 1 and last.startswith("[ERROR] "))


async def test_hive_import_ssh(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host gpu1\n  HostName 10.0.0.7\nHost *\n  User me\n")
    code, out, _ = await keeper(env, "hive-import-ssh", str(config), "--default-hive-port", "9000")
    assert code == 0
    assert "gpu1 http://10.0.0.7:9000" in out
    code, out, _ = await keeper(env, "hive-get", "gpu1")
    assert code == 0 and "gpu1: http://10.0.0.7:9000" in out


async def test_daemon_help_and_console_script() -> None:
    script = Path(sys.executable).parent / "trio-jobs"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "servers"]
    with trio.fail_after(20):
        result = await trio.run_process([*argv, "--help"], capture_stdout=True, check=False)
    assert result.returncode == 0
    for name in ("queen", "hive", "worker", "submit", "infer", "status", "cancel", "jobs"):
        assert name in result.stdout.decode()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _event(action: str, human: str, **fields: Any) -> NarrationEvent:
    return NarrationEvent(1, "job-1", 0.0, "hive", action, human, fields)


def test_printer_draws_a_progress_bar_on_a_terminal() -> None:
    out = _Tty()
    printer = Printer(json_lines=False, out=out)
    progress = {"done": 512 * 1024, "total": 1024 * 1024, "unit": "bytes"}
    printer.item(_event("download_progress", "m: half", progress=progress, rate_bytes_s=2048))
    printer.item(_event("download_progress", "m: all", progress={**progress, "done": 1 << 20}))
    printer.item(TerminalSignal(Signal.DONE))
    text = out.getvalue()
    assert "\r[###############---------------]  50.0% 512.0 KiB/1.0 MiB 2.0 KiB/s" in text
    assert "\r[##############################] 100.0% 1.0 MiB/1.0 MiB" in text
    assert text.endswith("\n[DONE]\n")


def test_printer_inline_tokens_and_plain_progress_off_a_terminal() -> None:
    out = io.StringIO()
    printer = Printer(json_lines=False, out=out)
    printer.item(_event("token", "Hi", token="Hi"))
    printer.item(_event("token", " there", token=" there"))
    printer.item(_event("download_progress", "m: 1 B", progress={"done": 1, "total": 2}))
    printer.item(TerminalSignal(Signal.ERROR, "boom"))
    assert out.getvalue() == "Hi there\n[hive] m: 1 B\n[ERROR] boom\n"


def test_printer_json_lines() -> None:
    out = io.StringIO()
    printer = Printer(json_lines=True, out=out)
    printer.item(_event("token", "Hi", token="Hi"))
    printer.item(TerminalSignal(Signal.CANCELLED))
    printer.job_id = "job-1"
    printer.item(TerminalSignal(Signal.ERROR, "boom"))
    printer.error("keeper's own")
    first, *signals = out.getvalue().splitlines()
    assert json.loads(first)["token"] == "Hi"
    assert [json.loads(line) for line in signals] == [
        {"signal": "CANCELLED"},
        {"signal": "ERROR", "message": "boom", "job_id": "job-1"},
        {"signal": "ERROR", "message": "keeper's own", "job_id": "job-1"},
    ]


async def test_daemon_on_a_busy_port_fails_clearly() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        with trio.fail_after(20):
            result = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "servers",
                    "queen",
                    *("--port", str(port)),
                    "--store",
                    "memory",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    finally:
        for listener in listeners:
            await listener.aclose()
    assert result.returncode == 1
    assert result.stdout == b""
    assert b"trio-jobs queen: cannot serve: " in result.stderr


def test_queen_config_files(tmp_path: Path) -> None:
    toml = tmp_path / "queen.toml"
    toml.write_text(
        'port = 0\ntoken = "t"\n[hives]\nlocalhost = "http://127.0.0.1:7834"\n'
        '[hives.gpu]\nurl = "http://10.0.0.2:7834/"\nssh_host = "gpu-box"\n'
    )
    data = load_config_file(toml)
    assert (data["port"], data["token"]) == (0, "t")
    hives = hives_from_config(data)
    assert hives["localhost"].url == "http://127.0.0.1:7834"
    assert (hives["gpu"].url, hives["gpu"].ssh_host) == ("http://10.0.0.2:7834", "gpu-box")
    as_json = tmp_path / "queen.json"
    as_json.write_text(json.dumps({"hives": {"a": "http://h:1"}}))
    assert hives_from_config(load_config_file(as_json))["a"].url == "http://h:1"
    with pytest.raises(ValueError, match="alias=http"):
        hives_from_config({"hives": {"bad": "ftp://x"}})
    assert parse_hive_flag("http://h:2").alias == "localhost"


async def test_queen_reads_hives_from_its_config_file(tmp_path: Path) -> None:
    config = tmp_path / "queen.toml"
    config.write_text('port = -1\n[hives]\nfarm = "http://127.0.0.1:9"\n[queen]\nport = 0\n')
    cluster = Cluster(tmp_path)
    try:
        queen = cluster.start("queen", ["queen", "--port", "0", "--config", str(config)])
        code, out, _ = await keeper(None, "--queen", queen, "hive-list")
        assert code == 0
        assert "farm http://127.0.0.1:9" in out
    finally:
        codes = cluster.close()
    assert codes == {"queen": 0}


async def test_detach_then_follow(env: Env) -> None:
    code, out, _ = await keeper(env, "--detach", "infer", "later", "--max-tokens", "5")
    assert code == 0
    job_id = out.strip()
    assert job_id.startswith("job-")
    code, out, _ = await keeper(env, "follow", job_id)
    assert code == 0
    assert out.splitlines()[-1] == "[DONE]"
    assert "".join(tiny_tokens("tiny", "later", max_tokens=5)) in out.splitlines()
    code, out, _ = await keeper(env, "follow", "job-nope")
    assert (code, out) == (1, "[ERROR] unknown job job-nope\n")


async def test_queen_and_hive_cors_and_allowed_host_flags(tmp_path: Path) -> None:
    """``--cors-origin`` and ``--allowed-host`` (or the config's lists) reach the server:
    the allowed origin reads cross-origin, another is refused, the allowed name answers."""
    config = tmp_path / "hive.toml"
    config.write_text('cors_origins = ["https://dash.example"]\nallowed_hosts = ["jobs.lan"]\n')
    cluster = Cluster(tmp_path)
    try:
        queen = cluster.start(
            "queen",
            [
                *("queen", "--port", "0", "--store", "memory"),
                *("--cors-origin", "https://app.example", "--allowed-host", "jobs.example.com"),
            ],
        )
        hive = cluster.start(
            "hive", ["hive", "--port", "0", "--store", "memory", "--config", str(config)]
        )
        async with httpx.AsyncClient(timeout=5) as http:
            for url, origin, host in (
                (queen, "https://app.example", "jobs.example.com"),
                (hive, "https://dash.example", "jobs.lan"),
            ):
                allowed = await http.get(f"{url}/v1/jobs", headers={"Origin": origin})
                assert allowed.headers["access-control-allow-origin"] == origin
                other = await http.get(f"{url}/v1/jobs", headers={"Origin": "https://x.example"})
                assert other.status_code == 403
                assert (await http.get(f"{url}/health", headers={"Host": host})).status_code == 200
                rebound = await http.get(f"{url}/health", headers={"Host": "evil.example"})
                assert rebound.status_code == 421
    finally:
        codes = cluster.close()
    assert codes == {"queen": 0, "hive": 0}


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--cors-origin", "app.example"], "must look like http(s)://host[:port]"),
        (["--allowed-host", "jobs.example.com:8080"], "must be a host name"),
    ],
)
async def test_bad_cors_and_host_flags_fail_clearly(flags: list[str], says: str) -> None:
    with trio.fail_after(20):
        result = await trio.run_process(
            [sys.executable, "-m", "servers", "queen", "--port", "0", "--store", "memory", *flags],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode != 0
    assert result.stdout == b""
    assert b"trio-jobs queen: " in result.stderr
    assert says.encode() in result.stderr
