"""The systemd units and the Kubernetes Deployment in examples/ say what the docs say, and work.

No YAML or unit-file library is a dependency: both are read line by line, enough to check the
settings that must agree with each other. The worker unit's ExecStop commands are run as they
are written (only the sleep is shortened) against the real example worker.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import signal
import subprocess
import urllib.request

import pytest

from graceful._deadline import FLUSH_SLICE
from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT

# The redis client (an extra) only for annotations: the rdb and redis_url fixtures skip a test
# when it is not installed, and the tests that need no Redis still run.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import redis

SYSTEMD = ROOT / "examples" / "systemd"
DEPLOYMENT = ROOT / "examples" / "kubernetes" / "deployment.yaml"


def unit(name: str) -> dict[str, list[str]]:
    """``key -> values`` of a unit file (keys repeat: ExecStop, Environment)."""
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def environment(settings: dict[str, list[str]]) -> dict[str, str]:
    return dict(value.split("=", 1) for value in settings.get("Environment", []))


@pytest.mark.parametrize(
    "name",
    ["demo-notify.service", "worker.service", "reload.service", "upgrade.service", "upgrade-reload.service"],
)
def test_each_unit_lets_graceful_finish_before_systemd_kills(name: str) -> None:
    settings = unit(name)
    assert settings["Type"][0] in {"notify", "notify-reload"}
    env = environment(settings)
    stop_timeout = float(settings["TimeoutStopSec"][0])
    assert float(env["GRACEFUL_TIMEOUT_STOP_SEC"]) == stop_timeout  # what graceful's warning checks
    budget = float(env.get("GRACEFUL_FORCE_QUIT", "25"))
    sleeps = sum(float(cmd.split()[-1]) for cmd in settings.get("ExecStop", []) if "sleep" in cmd)
    assert sleeps + budget + FLUSH_SLICE < stop_timeout


def test_the_notify_unit_has_a_watchdog() -> None:
    assert float(unit("demo-notify.service")["WatchdogSec"][0]) > 0


def test_the_upgrade_units_let_the_new_generation_speak_and_reload_with_sigusr2() -> None:
    upgrade, reload = unit("upgrade.service"), unit("upgrade-reload.service")
    assert upgrade["NotifyAccess"] == reload["NotifyAccess"] == ["all"]  # MAINPID= from the new one
    assert upgrade["ExecReload"] == ["/bin/kill -USR2 $MAINPID"]
    assert reload["ReloadSignal"] == ["SIGUSR2"]
    assert "KillMode" not in upgrade  # control-group: a stop reaches both generations
    assert unit("upgrade.socket")["ListenStream"] == ["8000"]


@pytest.mark.timeout(60)
def test_the_upgrade_units_reload_command_upgrades_the_real_demo(graceful_process: ProcessFactory) -> None:
    proc = graceful_process(ROOT / "examples" / "demo.py", env={"PORT": "0"})
    proc.wait_for_output("serving on http://127.0.0.1:")
    found = re.search(r"serving on http://127.0.0.1:(\d+)", proc.stderr)
    assert found is not None
    url = f"http://127.0.0.1:{found.group(1)}/"
    for command in unit("upgrade.service")["ExecReload"]:
        subprocess.run(shlex.split(command.replace("$MAINPID", str(proc.pid))), check=True, timeout=BOUND)
    proc.wait_for_output(f"this generation (pid {proc.pid}) stops accepting")  # the new one is ready
    ready = re.search(r"the next generation \(pid (\d+)\) is ready", proc.stderr)
    assert ready is not None
    new = int(ready.group(1))
    pidfd = os.pidfd_open(new)
    try:
        with urllib.request.urlopen(url, timeout=BOUND) as response:  # the same port, the new process
            assert response.status == 200
        # The new generation holds the old one's stdout and stderr: stopped first, so that the
        # old one's result has its whole output.
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        assert select.select([pidfd], [], [], BOUND)[0], "the new generation did not stop"
    finally:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
    result = proc.wait(BOUND)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("database connections closed") == 2  # each generation's shutdown ran
    assert f"MAINPID={new}" in result.notifications  # systemd follows the new one


def test_the_worker_unit_pauses_waits_then_terminates() -> None:
    assert unit("worker.service")["ExecStop"] == [
        "/bin/kill -TSTP $MAINPID",
        "/bin/sleep 10",
        "/bin/kill -TERM $MAINPID",
    ]


@pytest.mark.timeout(60)
def test_the_worker_units_stop_commands_drain_the_real_worker(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    proc = graceful_process(ROOT / "examples" / "queue_worker.py", env={"REDIS_URL": redis_url})
    for command in unit("worker.service")["ExecStop"]:
        argv = shlex.split(command.replace("$MAINPID", str(proc.pid)))
        if argv[0].endswith("sleep"):
            assert proc.wait_for_output("fetching stopped") is None  # the pause took effect
            rdb.lpush("jobs", "arrived-during-the-pause")
            continue
        subprocess.run(argv, check=True, timeout=BOUND)
    result = proc.wait(30)
    assert result.returncode == 0, result.stderr
    assert rdb.lrange("jobs", 0, -1) == ["arrived-during-the-pause"]  # not fetched after TSTP
    assert rdb.keys("graceful:workers:*") == []


def _yaml_value(text: str, key: str) -> str:
    match = re.search(rf"^\s*{re.escape(key)}:\s*(.+)$", text, flags=re.MULTILINE)
    assert match is not None, key
    return match.group(1).strip().strip('"')


def _env(text: str) -> dict[str, str]:
    pairs = re.findall(r"- name: (\w+)\n\s+value: \"?([^\"\n]+)\"?", text)
    return dict(pairs)


def test_the_deployment_settings_agree() -> None:
    text = DEPLOYMENT.read_text()
    env = _env(text)
    grace = float(_yaml_value(text, "terminationGracePeriodSeconds"))
    assert float(env["GRACEFUL_TERMINATION_GRACE"]) == grace
    assert float(env["GRACEFUL_DRAIN_DELAY"]) + float(env["GRACEFUL_FORCE_QUIT"]) < grace
    assert "path: /readyz" in text
    assert "path: /livez" in text
    probes_port = re.search(r"- name: probes\n\s+containerPort: (\d+)", text)
    assert probes_port is not None
    assert env["GRACEFUL_PROBE_PORT"] == probes_port.group(1)
    assert env["HOST"] == "0.0.0.0"  # the kubelet and the Service reach the pod's IP


@pytest.mark.timeout(60)
def test_the_demo_runs_with_the_deployments_environment(graceful_process: ProcessFactory) -> None:
    """The demo, configured as the Deployment configures it (on loopback here), drains on SIGTERM."""
    env = {
        **_env(DEPLOYMENT.read_text()),
        "HOST": "127.0.0.1",
        "GRACEFUL_PROBE_HOST": "127.0.0.1",
        "PORT": "0",
        "GRACEFUL_PROBE_PORT": str(_free()),
        "GRACEFUL_DRAIN_DELAY": "0.2",
    }
    proc = graceful_process(ROOT / "examples" / "demo.py", env=env)
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(30)
    assert result.returncode == 0, result.stderr
    assert "answering probes on port" in result.stderr


def _free() -> int:
    from .support.web import free_port

    return free_port()
