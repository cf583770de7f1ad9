"""graceful.dramatiq: the real ``dramatiq`` command, a real Redis broker, real signals.

Each worker is ``python -c "dramatiq's main()" tests.support.dramatiq_app`` (the ``dramatiq``
command itself: a main process that forks one worker process and forwards signals to it),
started by the ``graceful_process`` fixture, which returns once the worker process has sent
READY=1 at Dramatiq's ``after_worker_boot``. The app (tests/support/dramatiq_app.py) writes
``EV <event> <pid>`` lines; the tests read the order of events from them, and what is queued or
held from Redis (Dramatiq's keys: ``dramatiq:<queue>`` lists the message ids waiting,
``dramatiq:__acks__.<worker>.<queue>`` those a worker holds).
"""

from __future__ import annotations

import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from graceful.testing import GracefulProcess

from .conftest import BOUND
from .support.redis_server import free_port

dramatiq = pytest.importorskip("dramatiq")
redis = pytest.importorskip("redis")

from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker  # noqa: E402 - after the skip

DRAMATIQ = "import sys; from dramatiq.cli import main; sys.exit(main())"
START = 30.0  # seconds: importing Dramatiq and forking its worker process on a busy machine
QUEUE = "dramatiq:default"


def worker(
    graceful_process: Callable[..., GracefulProcess], redis_url: str, *, wait_ready: bool = True, **env: str
) -> GracefulProcess:
    """``dramatiq tests.support.dramatiq_app`` with one worker process of one thread (prefetch 2)."""
    args = ["tests.support.dramatiq_app", "--processes", "1", "--threads", "1"]
    return graceful_process(
        DRAMATIQ,
        env={"DRAMATIQ_REDIS_URL": redis_url, **env},
        ready_timeout=START,
        args=args,
        wait_ready=wait_ready,
    )


def send(redis_url: str, actor: str, *args: Any) -> str:
    """Enqueue a message for ``actor`` by name (this process never imports the app); its id."""
    broker = RedisBroker(url=redis_url)
    message = dramatiq.Message(queue_name="default", actor_name=actor, args=args, kwargs={}, options={})
    broker.enqueue(message)
    broker.client.close()
    return str(message.message_id)


def events(stdout: str) -> list[str]:
    return re.findall(r"^EV (\S+) \d+$", stdout, re.MULTILINE)


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=BOUND) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def held(rdb: redis.Redis) -> int:
    """How many messages the workers hold unacknowledged (every worker, every queue)."""
    return sum(int(rdb.scard(key)) for key in rdb.scan_iter("dramatiq:__acks__.*"))


def wait_until(condition: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def heartbeat_after(rdb: redis.Redis, moment_ms: float) -> None:
    """Wait until the (only) worker's heartbeat in Redis is later than ``moment_ms``."""

    def beaten() -> bool:
        beats = rdb.zrange("dramatiq:__heartbeats__", 0, -1, withscores=True)
        return bool(beats) and max(score for _, score in beats) > moment_ms

    wait_until(beaten, f"a heartbeat after {moment_ms}")


def maintenance(redis_url: str) -> None:
    """What another worker's Dramatiq does now and then: put back the messages of every worker
    whose heartbeat is older than 1 s (here on every command)."""
    other = RedisBroker(url=redis_url, heartbeat_timeout=1000, maintenance_chance=MAINTENANCE_SCALE)
    other.do_qsize("default")
    other.client.close()


def now_ms(rdb: redis.Redis) -> float:
    seconds, micros = rdb.time()
    return seconds * 1000 + micros / 1000


@pytest.mark.timeout(90)
def test_warm_stop_finishes_the_message_keeps_the_heartbeat_and_puts_back_the_prefetched(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """SIGTERM: wrap-up, the actor sees it and completes, the prefetched message goes back at once,
    the heartbeat goes on (no other worker takes the messages held), shutdown after, exit 0."""
    port = free_port()
    proc = worker(graceful_process, redis_url, GRACEFUL_PROBE_PORT=str(port), DRAMATIQ_HEARTBEAT_MS="1000")
    assert (probe(port, "/readyz"), probe(port, "/livez")) == (200, 200)
    send(redis_url, "hold", "k")
    send(redis_url, "note", "a")
    send(redis_url, "note", "b")
    proc.wait_for_output("EV start-k")
    # One thread, prefetch 2: `hold` runs, `note a` waits in the worker, `note b` in Redis.
    wait_until(lambda: held(rdb) == 2 and rdb.llen(QUEUE) == 1, "two held, one queued")
    heartbeat_after(rdb, now_ms(rdb) + 1500)
    maintenance(redis_url)
    assert (held(rdb), rdb.llen(QUEUE)) == (2, 1)  # not taken for a dead worker's

    proc.send_signal(signal.SIGTERM)
    proc.wait_for_output("EV saw-stopping-True")  # is_stopping() inside the running actor
    assert (probe(port, "/readyz"), probe(port, "/livez")) == (503, 200)
    wait_until(lambda: (held(rdb), rdb.llen(QUEUE)) == (1, 2), "the prefetched message put back")
    # Still beating while it drains (Dramatiq #159), though graceful paused the consumers (they
    # are what beats in plain Dramatiq): without graceful's own heartbeat this wait fails.
    heartbeat_after(rdb, now_ms(rdb) + 1500)
    maintenance(redis_url)
    assert (held(rdb), rdb.llen(QUEUE)) == (1, 2)
    rdb.rpush("k:release", "go")
    result = proc.wait(START)

    assert result.returncode == 0, result.stderr
    seen = events(result.stdout)
    # The actor wakes as the wrap-up begins, while the wrap-up listeners run: either comes first.
    assert seen[0] == "start-k", seen
    assert seen[3:] == ["end-k", "shutdown"], seen
    assert sorted(seen[1:3]) == ["saw-stopping-True", "wrap-up"], seen
    assert rdb.llen("k:done") == 1  # ran once
    assert (held(rdb), rdb.llen(QUEUE)) == (0, 2)  # both notes wait for the next worker
    assert "READY=1" in result.notifications
    assert "STOPPING=1" in result.notifications
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(90)
def test_a_message_past_the_deadline_is_named_put_back_and_runs_on_the_next_worker(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """At graceful's deadline: the report names the message and where it is, it goes back on its
    queue, ``dramatiq`` exits 70, and the next worker runs it."""
    proc = worker(graceful_process, redis_url, GRACEFUL_FORCE_QUIT="2")
    message_id = send(redis_url, "stuck", "s")
    proc.wait_for_output("EV stuck-s")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(START)

    assert result.returncode == 70, result.stderr
    err = result.stderr
    assert "graceful: force quit: the force-quit deadline of 2 s passed" in err
    assert "graceful: dramatiq messages still running at the deadline: 1" in err
    assert f"stuck[{message_id}] on queue 'default'" in err
    assert re.search(r'File ".*dramatiq_app\.py", line \d+, in stuck\n\s+graceful\.wait_for_shutdown', err), (
        err
    )
    assert f"dramatiq message stuck[{message_id}] put back on queue 'default'" in err
    assert "EV shutdown" not in result.stdout  # forced: its shutdown phase never began
    assert (held(rdb), rdb.llen(QUEUE)) == (0, 1)

    again = worker(graceful_process, redis_url)
    again.wait_for_output("EV end-s")
    again.send_signal(signal.SIGTERM)
    assert again.wait(START).returncode == 0
    assert rdb.get("s:runs") == "2"
    assert rdb.llen("s:done") == 1


@pytest.mark.timeout(90)
def test_job_iteration_hands_the_rest_on_and_the_next_worker_finishes_it(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """graceful.iteration in a real Dramatiq worker: SIGTERM mid-walk, the job sends the rest of
    itself from its cursor, the next worker finishes it: every item done exactly once."""
    total = 40
    send(redis_url, "walk", "w", total)
    first = worker(graceful_process, redis_url, ITEM_SECONDS="0.05")
    first.wait_for_output("EV item-3")
    first.send_signal(signal.SIGTERM)
    one = first.wait(START)
    assert one.returncode == 0, one.stderr
    handed = re.search(r"^EV handed-on-at-(\d+) ", one.stdout, re.MULTILINE)
    assert handed is not None, one.stdout
    assert 3 < int(handed.group(1)) < total  # it stopped mid-walk, between two items

    second = worker(graceful_process, redis_url)
    second.wait_for_output("EV walked-w")
    second.send_signal(signal.SIGTERM)
    assert second.wait(START).returncode == 0
    assert sorted(int(item) for item in rdb.lrange("w:items", 0, -1)) == list(range(total))


@pytest.mark.timeout(60)
def test_a_second_sigterm_forces_the_quit_with_the_message_put_back(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """Dramatiq's second signal (a second Ctrl-C) is a cold stop: graceful's report, the message
    back on its queue, exit 70 (plain Dramatiq exits 1 and leaves it to the heartbeat timeout)."""
    proc = worker(graceful_process, redis_url)
    message_id = send(redis_url, "stuck", "t")
    proc.wait_for_output("EV stuck-t")
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_output("EV wrap-up")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(START)

    assert result.returncode == 70, result.stderr
    assert "SIGTERM again: dramatiq's cold stop" in result.stderr
    assert f"dramatiq message stuck[{message_id}] put back on queue 'default'" in result.stderr
    assert (held(rdb), rdb.llen(QUEUE)) == (0, 1)


@pytest.mark.timeout(60)
def test_a_failed_listener_makes_dramatiq_exit_1(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """The exit code says what happened: a shutdown listener raised, so the worker process and
    ``dramatiq`` exit 1 (a worker process returning normally would exit 0)."""
    proc = worker(graceful_process, redis_url, APP_FAIL_SHUTDOWN="1")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(START)
    assert result.returncode == 1, result.stderr
    assert "this shutdown listener fails" in result.stderr
    assert events(result.stdout) == ["wrap-up", "shutdown"]


@pytest.mark.timeout(60)
def test_a_bad_graceful_variable_stops_the_worker_at_start(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """GRACEFUL_PROBE_PORT=abc: the worker process does not start without graceful; exit 1, said why."""
    proc = worker(graceful_process, redis_url, wait_ready=False, GRACEFUL_PROBE_PORT="abc")
    result = proc.wait(START)
    assert result.returncode == 1, result.stderr
    assert "graceful: the dramatiq worker cannot start" in result.stderr
    assert "GRACEFUL_PROBE_PORT" in result.stderr
    assert "READY=1" not in result.notifications


def test_a_worker_started_in_the_program_is_left_alone() -> None:
    """A ``dramatiq.Worker`` a test suite starts itself (StubBroker): no signal handler, listener or
    lifecycle of the process is touched; the actor runs as without graceful."""
    from dramatiq.brokers.stub import StubBroker

    import graceful
    import graceful.dramatiq

    broker = StubBroker()
    graceful.dramatiq.install(broker)
    graceful.dramatiq.install(broker)
    assert sum(isinstance(m, graceful.dramatiq.GracefulMiddleware) for m in broker.middleware) == 1
    ran = []

    @dramatiq.actor(broker=broker)
    def job(x: int) -> None:
        ran.append((x, graceful.is_stopping()))

    before = signal.getsignal(signal.SIGTERM)
    status = graceful.status()
    worker_ = dramatiq.Worker(broker, worker_timeout=50)
    worker_.start()
    try:
        job.send(1)
        broker.join(job.queue_name, timeout=int(BOUND * 1000))
        worker_.join()
    finally:
        worker_.stop()
    assert ran == [(1, False)]
    assert signal.getsignal(signal.SIGTERM) is before
    assert graceful.status().state is status.state
    assert len(graceful.status().listeners) == len(status.listeners)


def test_install_takes_a_dramatiq_broker() -> None:
    """install() refuses what is not a broker, with a sentence that says what it takes."""
    import graceful.dramatiq

    with pytest.raises(TypeError, match=r"dramatiq\.Broker"):
        graceful.dramatiq.install(object())  # type: ignore[arg-type]
