"""Operator configuration: config files checked strictly by every daemon, and ``hive-start``
giving a hive the operator's config file, state directory, models directory and token.

Daemons are real processes (``python -m servers ...``) on 127.0.0.1; the SSH start runs
through a stand-in ``ssh`` on ``PATH`` that runs the remote command locally, so the command
the queen generates is really executed by ``sh``.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
import trio

from servers.cli import build_parser
from servers.cli._daemons import check_bind
from servers.queen import ConfigError, HiveEntry, read_config, validate_config
from servers.queen._server import hive_argv, remote_hive_command
from tests.daemons import Cluster, closed_port, pid_alive, wait_pid_gone

TOKEN = "config-test-token"


async def _run(*argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "servers", *argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


# ---- strict config files --------------------------------------------------------------------


def test_unknown_keys_and_sections_are_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(
            {
                "schedule_wait": 1,
                "queeen": {"schedule_wait_s": 1},
                "hive": {"modles_dir": "m", "heartbeat_s": "fast"},
                "worker": {"backend": "tiny", "zzz": 1},
                "hives": {"gpu": {"url": "http://gpu:1", "ssh_hots": "gpu"}},
                "port": True,
            }
        )
    message = str(caught.value)
    for part in (
        "unknown key 'schedule_wait' (did you mean 'schedule_wait_s'?)",
        "unknown section [queeen] (did you mean [queen]?)",
        "unknown key 'modles_dir' in [hive] (did you mean 'models_dir'?)",
        "[hive] heartbeat_s must be a number, got 'fast'",
        "unknown key 'zzz' in [worker]",
        "unknown key 'ssh_hots' in [hives.gpu] (did you mean 'ssh_host'?)",
        "port must be an integer, got True",
    ):
        assert part in message, message
    # a key of another daemon's section is wrong there, though known at the top level
    with pytest.raises(ConfigError, match=r"unknown key 'models_dir' in \[queen\]"):
        validate_config({"queen": {"models_dir": "m"}})
    validate_config({"models_dir": "m", "schedule_wait_s": 2, "queen": {"port": 0}})


@pytest.mark.parametrize("daemon", ["queen", "hive", "worker"])
async def test_a_config_typo_stops_the_daemon_with_exit_2(tmp_path: Path, daemon: str) -> None:
    """The issue's case: ``schedule_wait_s = 1`` under a misspelt section used to be ignored
    (the queen waited the default 10 s); now no daemon starts on that file."""
    config = tmp_path / "cluster.toml"
    config.write_text(f"[{daemon}]\nport = 0\n\n[queeen]\nschedule_wait_s = 1\n")
    code, out, err = await _run(daemon, "--config", str(config), "--port", "0")
    assert (code, out) == (2, "")
    assert f"trio-jobs {daemon}: {config}: unknown section [queeen] (did you mean [queen]?)" in err


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "cluster.toml"
    config.parent.mkdir()
    config.write_text(
        'state_dir = "state"\nstore = "sqlite:jobs/q.db"\n'
        '[hive]\nmodels_dir = "../models"\nstore = "memory"\n'
    )
    queen = read_config(config, "queen")
    assert queen["state_dir"] == str(tmp_path / "etc" / "state")
    assert queen["store"] == f"sqlite:{tmp_path / 'etc' / 'jobs' / 'q.db'}"
    assert "models_dir" not in queen
    hive = read_config(config, "hive")
    assert Path(hive["models_dir"]).resolve() == tmp_path / "models"
    assert hive["store"] == "memory"


# ---- hive-start -----------------------------------------------------------------------------


async def test_hive_start_gives_a_local_hive_the_operators_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queen runs in another directory; the hive it starts reads the operator's config
    file, keeps its store in the config's state dir, its models in the config's models dir
    (relative to the file), and requires the queen's token. ``hive-start --models-dir``
    given by the keeper wins, resolved against the keeper's directory."""
    conf, elsewhere, operator = tmp_path / "conf", tmp_path / "queen-cwd", tmp_path / "op"
    for directory in (conf, elsewhere, operator, conf / "models-here", operator / "mine"):
        directory.mkdir()
    (conf / "models-here" / "from-config.bin").write_bytes(b"x")
    (operator / "mine" / "from-keeper.bin").write_bytes(b"y")
    port = closed_port()
    config = conf / "cluster.toml"
    config.write_text(
        f'state_dir = "state"\ntoken = "{TOKEN}"\n'
        f'[hives]\nlocalhost = "http://127.0.0.1:{port}"\n'
        '[hive]\nmodels_dir = "models-here"\n'
    )
    cluster = Cluster(tmp_path)
    try:
        monkeypatch.chdir(elsewhere)  # the queen inherits it as its working directory
        queen = cluster.start("queen", ["queen", "--port", "0", "--config", str(config)])
        keeper = ("--queen", queen, "--token", TOKEN)
        code, out, err = await _run(*keeper, "hive-start", cwd=operator)
        assert code == 0, out + err
        assert (
            f"Starting hive localhost here: config {config}, state dir {conf / 'state'}, "
            f"models in {conf / 'models-here'}"
        ) in out
        code, out, _ = await _run(*keeper, "model-list", cwd=operator)
        assert code == 0 and "from-config.bin" in out, out
        assert (conf / "state" / "hive.db").exists()
        assert not (elsewhere / "models").exists()
        async with httpx.AsyncClient(timeout=5) as http:
            answer = await http.get(f"http://127.0.0.1:{port}/v1/jobs")
        assert answer.status_code == 401  # the hive got the token
        code, out, _ = await _run(*keeper, "hive-stop")
        assert code == 0, out
        code, out, err = await _run(*keeper, "hive-start", "--models-dir", "mine", cwd=operator)
        assert code == 0, out + err
        code, out, _ = await _run(*keeper, "model-list", cwd=operator)
        assert "from-keeper.bin" in out and "from-config.bin" not in out, out
        code, out, _ = await _run(*keeper, "hive-start")
        assert code == 0 and "already running" in out
    finally:
        codes = cluster.close()
    assert codes == {"queen": 0}


def test_the_ssh_start_command_is_one_our_cli_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The remote command binds 0.0.0.0 with the token from its first stdin line (never on
    the command line) and the queen's URL; its argv parses with our own parser and passes
    the bind check that refused the old command."""
    entry = HiveEntry("gpu", "http://10.0.0.7:7900", ssh_host="gpu-box", token="s3cret")
    argv = hive_argv(entry, "0.0.0.0", "http://queen.lan:7833", models_dir="/srv/models")
    command = remote_hive_command(argv)
    assert "s3cret" not in command
    outer = shlex.split(command)
    assert outer[:2] == ["sh", "-c"]
    script = outer[2]
    assert script.startswith("IFS= read -r TRIO_JOBS_TOKEN || exit 1; export TRIO_JOBS_TOKEN; ")
    words = shlex.split(script.split("nohup ", 1)[1])
    assert words[0] == "trio-jobs"
    cli = words[1 : words.index("</dev/null") if "</dev/null" in words else None]
    monkeypatch.setenv("TRIO_JOBS_TOKEN", "s3cret")  # what the script exports
    args = build_parser().parse_args(cli)
    assert (args.command, args.host, args.port, args.hive_id) == ("hive", "0.0.0.0", 7900, "gpu")
    assert (args.queen, args.models_dir, args.token) == (
        "http://queen.lan:7833",
        "/srv/models",
        "s3cret",
    )
    check_bind(args, args.host, args.token)  # passes
    monkeypatch.delenv("TRIO_JOBS_TOKEN")
    args = build_parser().parse_args(cli)
    with pytest.raises(SystemExit) as refused:
        check_bind(args, args.host, args.token)
    assert refused.value.code == 2


def _own_address() -> str:
    """This machine's address on its default route (a non-loopback "remote" hive URL)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # picks a route; sends nothing
        except OSError:
            pytest.skip("no non-loopback IPv4 address on this machine")
        address: str = probe.getsockname()[0]
    if ipaddress.ip_address(address).is_loopback:
        pytest.skip("no non-loopback IPv4 address on this machine")
    return address


async def test_hive_start_over_ssh_runs_a_command_that_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in ``ssh`` runs the generated command with ``sh`` here; the hive it starts
    binds 0.0.0.0 and requires the token it read from stdin."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pid_file = tmp_path / "hive.pid"
    (bin_dir / "ssh").write_text(
        '#!/bin/sh\nwhile [ "$1" = "-o" ]; do shift 2; done\nshift\nexec sh -c "$*"\n'
    )
    (bin_dir / "trio-jobs").write_text(
        f'#!/bin/sh\necho $$ > "{pid_file}"\nexec "{sys.executable}" -m servers "$@"\n'
    )
    for name in ("ssh", "trio-jobs"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    address = _own_address()
    port = closed_port()
    config = tmp_path / "queen.toml"
    config.write_text(
        f'token = "{TOKEN}"\n[hives.far]\nurl = "http://{address}:{port}"\nssh_host = "far-box"\n'
    )
    cluster = Cluster(tmp_path)
    pid = None
    try:
        queen = cluster.start("queen", ["queen", "--port", "0", "--config", str(config)])
        code, out, err = await _run("--queen", queen, "--token", TOKEN, "hive-start", "far")
        assert code == 0, out + err
        assert "$ ssh -o BatchMode=yes -o ConnectTimeout=5 far-box sh -c" in out
        assert TOKEN not in out
        pid = int(pid_file.read_text())
        async with httpx.AsyncClient(timeout=5) as http:
            url = f"http://{address}:{port}"
            assert (await http.get(f"{url}/v1/jobs")).status_code == 401
            headers = {"Authorization": f"Bearer {TOKEN}"}
            assert (await http.get(f"{url}/v1/jobs", headers=headers)).status_code == 200
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            await wait_pid_gone(pid)
        codes = cluster.close()
    assert codes == {"queen": 0}
