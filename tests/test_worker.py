"""The generic queue worker and the Redis registration, against a real redis-server.

The worker under test consumes the Redis list ``jobs`` (BRPOP; requeue = RPUSH, the end BRPOP
takes next). A job ``kind:id`` prints ``start kind:id``; ``slow`` jobs wait until the test
writes a line to the worker's stdin; ``iter`` jobs work step by step until graceful is
stopping, then requeue themselves with their checkpoint; finished jobs go to the set ``done``.
Setting the key ``break-fetch`` makes ``fetch`` raise, as if the queue were gone.
"""

from __future__ import annotations

import json
import re
import signal
import threading

import pytest

import graceful
from graceful import Lifecycle
from graceful._service import Context
from graceful.adapters.heartbeat import Registration
from graceful.adapters.worker import Requeue, Worker
from graceful.testing import GracefulProcess, ProcessFactory

from .conftest import BOUND, ROOT

# The redis client (an extra) only for annotations: the rdb and redis_url fixtures skip a test
# when it is not installed, and the tests that need no Redis still run.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import redis

WORKER = r"""
import logging, sys, threading
import redis
import graceful
from graceful.adapters.heartbeat import Registration
from graceful.adapters.worker import Requeue, Worker

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
r = redis.Redis.from_url(sys.argv[1], decode_responses=True)
release = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), release.set()), daemon=True).start()

def fetch(timeout):
    if r.exists("break-fetch"):
        raise redis.ConnectionError("the queue is gone")
    item = r.brpop("jobs", timeout=timeout)
    return item[1] if item else None

def handle(job):
    kind, _, ident = job.partition(":")
    sys.stdout.write(f"start {job}\n")
    sys.stdout.flush()
    if kind == "slow":
        release.wait()
    elif kind == "iter":
        step = 0
        one_step = threading.Event()
        while not graceful.is_stopping():  # a long job checks between steps
            step += 1
            one_step.wait(0.01)  # the work of one step
        raise Requeue(f"iter:{ident}@{step}")  # the checkpoint travels with the job
    r.sadd("done", job)

def requeue(job):
    r.rpush("jobs", job)

worker = Worker(fetch, handle, requeue, concurrency=2, name="mailer", poll=0.2)
sys.exit(graceful.run([worker, Registration(r, "mailer", ttl=3)]))
"""


def start_worker(graceful_process: ProcessFactory, url: str, **env: str) -> GracefulProcess:
    child = graceful_process(f"import sys; sys.argv = ['worker', {url!r}]\n" + WORKER, env=env, stdin=True)
    child.wait_for_output("ready", stream="stderr")
    return child


def registered(client: redis.Redis) -> list[str]:
    return sorted(client.keys("graceful:workers:mailer:*"))


def state(client: redis.Redis) -> str:
    (key,) = registered(client)
    value: str = json.loads(client.get(key))["state"]
    return value


def wait_registered(client: redis.Redis) -> list[str]:
    """The keys, once there is one (servers start together: the registration may come second)."""
    pause = threading.Event()
    for _ in range(int(BOUND / 0.01)):
        keys = registered(client)
        if keys:
            return keys
        pause.wait(0.01)  # polling Redis: there is no event to wait on
    raise AssertionError("the worker never registered")


# -- the generic worker, in a real process, with real signals -----------------------------------


@pytest.mark.timeout(60)
def test_jobs_in_flight_at_sigterm_finish_and_nothing_new_is_fetched(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    child = start_worker(graceful_process, redis_url)
    assert len(registered(rdb)) == 1
    rdb.lpush("jobs", "slow:1", "slow:2")
    child.wait_for_line("start slow")
    child.wait_for_line("start slow")
    rdb.lpush("jobs", "fast:3")  # both consumers are busy: it waits in the queue
    child.send_signal(signal.SIGTERM)
    child.wait_for_output("shutting down: fetching stopped; 2 job(s) in hand", stream="stderr")
    assert state(rdb) == "draining"  # registered (and beating) while the jobs finish
    child.send_line("release")
    assert child.wait().returncode == 0
    assert rdb.smembers("done") == {"slow:1", "slow:2"}
    assert rdb.lrange("jobs", 0, -1) == ["fast:3"]  # never fetched after the wrap-up
    assert registered(rdb) == []
    assert "mailer: stopped (2 done, 0 failed, 0 requeued)" in child.stderr


@pytest.mark.timeout(60)
def test_a_job_in_flight_at_the_deadline_is_requeued_and_named(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    child = start_worker(graceful_process, redis_url, GRACEFUL_FORCE_QUIT="1")
    rdb.lpush("jobs", "slow:stuck")
    child.wait_for_line("start slow:stuck")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 70
    assert rdb.lrange("jobs", 0, -1) == ["slow:stuck"]
    assert "mailer: job 'slow:stuck' still running at the force-quit deadline (for " in child.stderr
    assert registered(rdb) == []


@pytest.mark.timeout(60)
def test_sigtstp_stops_fetching_and_keeps_the_process_up_until_sigterm(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    child = start_worker(graceful_process, redis_url)
    child.send_signal(signal.SIGTSTP)
    child.wait_for_output("mailer: paused: fetching stopped", stream="stderr")
    child.wait_for_output("mailer: stopped (0 done", stream="stderr")  # every consumer has left fetch()
    rdb.lpush("jobs", "fast:after-pause")
    assert child.returncode is None
    assert state(rdb) == "paused"  # still registered while paused
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    assert rdb.lrange("jobs", 0, -1) == ["fast:after-pause"]  # never fetched
    assert registered(rdb) == []


@pytest.mark.timeout(60)
def test_a_long_job_checkpoints_and_requeues_itself_when_stopping(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    child = start_worker(graceful_process, redis_url)
    rdb.lpush("jobs", "iter:42")
    child.wait_for_line("start iter:42")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    (requeued,) = rdb.lrange("jobs", 0, -1)
    assert requeued.startswith("iter:42@")  # back on the queue with its checkpoint
    assert f"job {requeued!r} asked to be requeued: requeued" in child.stderr


@pytest.mark.timeout(60)
def test_a_fetch_that_raises_drains_the_jobs_in_hand_and_exits_1(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    child = start_worker(graceful_process, redis_url)
    rdb.lpush("jobs", "slow:in-hand")
    child.wait_for_line("start slow:in-hand")
    rdb.set("break-fetch", 1)  # the other consumer's next fetch raises
    child.wait_for_output(
        "shutting down: fetching stopped; 1 job(s) in hand: 'slow:in-hand'", stream="stderr"
    )
    child.send_line("release")
    assert child.wait().returncode == 1
    assert rdb.smembers("done") == {"slow:in-hand"}
    assert "mailer: fetch() failed" in child.stderr
    assert registered(rdb) == []  # the crash path removes the registration too


# -- in process: the other exit paths of the registration, and the worker's rules ---------------


@pytest.mark.timeout(30)
def test_the_registration_is_removed_after_shutdown_from_code(fresh: Lifecycle, rdb: redis.Redis) -> None:
    seen: list[list[str]] = []

    def stop_after_checking() -> None:
        seen.append(wait_registered(rdb))
        fresh.shutdown("done", wait=False)

    assert graceful.run([stop_after_checking, Registration(rdb, "mailer")]) == 0
    assert len(seen[0]) == 1
    assert registered(rdb) == []


@pytest.mark.timeout(30)
def test_the_registration_is_removed_when_a_server_crashes(fresh: Lifecycle, rdb: redis.Redis) -> None:
    def crash() -> None:
        wait_registered(rdb)
        raise RuntimeError("boom")

    assert graceful.run([crash, Registration(rdb, "mailer")]) == 1
    assert registered(rdb) == []


@pytest.mark.timeout(30)
def test_the_heartbeat_refreshes_the_key(fresh: Lifecycle, rdb: redis.Redis) -> None:
    beats = threading.Event()

    def watch() -> None:
        first = json.loads(rdb.get(wait_registered(rdb)[0]))["seen"]
        deadline = threading.Event()
        while not deadline.wait(0.05):  # polling Redis: there is no event to wait on
            value = rdb.get(registered(rdb)[0])
            if value is not None and json.loads(value)["seen"] > first:
                beats.set()
                break
        fresh.shutdown("seen a heartbeat", wait=False)

    timer = threading.Timer(BOUND, lambda: fresh.shutdown("no heartbeat", wait=False))
    timer.start()
    try:
        assert graceful.run([watch, Registration(rdb, "mailer", ttl=1)]) == 0
    finally:
        timer.cancel()
    assert beats.is_set()
    assert registered(rdb) == []


def test_a_heartbeat_never_writes_the_key_back_after_its_removal(rdb: redis.Redis) -> None:
    registration = Registration(rdb, "mailer")
    registration._write()
    assert 0 < rdb.pttl(registration.key) <= 15_000
    registration._remove()
    registration._write()  # a heartbeat that lost the race with the force-quit hook
    assert registered(rdb) == []


def test_bad_input_says_what_to_do(rdb: redis.Redis) -> None:
    with pytest.raises(TypeError, match="Redis client"):
        Registration(object(), "x")
    with pytest.raises(ValueError, match="ttl"):
        Registration(rdb, "x", ttl=0)
    with pytest.raises(ValueError, match="name"):
        Registration(rdb, "")
    with pytest.raises(TypeError, match="fetch"):
        Worker(None, print, print)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency"):
        Worker(print, print, print, concurrency=0)
    with pytest.raises(ValueError, match="poll"):
        Worker(print, print, print, poll=0)
    with pytest.raises(ValueError, match="poll"):
        Worker(print, print, print, poll=float("inf"))


@pytest.mark.timeout(30)
def test_in_process_a_failing_job_is_logged_and_counted_and_the_worker_goes_on(
    fresh: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = ["bad", "good", "again", "checkpoint"]
    handled: list[str] = []

    def fetch(timeout: float) -> str | None:
        if jobs:
            return jobs.pop(0)
        fresh.shutdown("queue empty", wait=False)
        return None

    def handle(job: str) -> None:
        if job == "bad":
            raise ValueError("bad job")
        if job == "again":
            raise Requeue
        if job == "checkpoint":
            raise Requeue("checkpoint@3")
        handled.append(job)

    def describe(job: str) -> str:
        raise KeyError(job)  # a broken describe: the log falls back to repr

    requeued: list[str] = []
    worker = Worker(fetch, handle, requeued.append, poll=0.05, describe=describe)
    assert graceful.run(worker) == 0  # a failed job is the queue's business, not a crash
    assert (worker.done, worker.failed, worker.requeued) == (1, 1, 2)
    assert handled == ["good"]
    assert requeued == ["again", "checkpoint@3"]
    assert "job 'bad' failed" in caplog.text


def test_a_stop_that_came_before_serve_is_not_lost(fresh: Lifecycle) -> None:
    fetched: list[float] = []
    worker = Worker(fetched.append, print, print, poll=0.05)
    fresh.wrap_up("paused while starting")
    worker.serve(Context(fresh, worker.name))  # returns: nothing to fetch once stopping
    assert fetched == []


# -- the example ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_queue_worker_example_drains_and_deregisters(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    proc = graceful_process(ROOT / "examples" / "queue_worker.py", env={"REDIS_URL": redis_url})
    assert len(wait_registered(rdb)) == 1
    rdb.lpush("jobs", "send-welcome-mail:1")
    proc.wait_for_output("working on send-welcome-mail:1")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(30)
    assert result.returncode == 0, result.stderr
    assert "fetching stopped; 1 job(s) in hand: 'send-welcome-mail:1'" in result.stderr
    assert "done: send-welcome-mail:1" in result.stderr
    assert "mailer: stopped (1 done, 0 failed, 0 requeued)" in result.stderr
    assert re.search(r"registration mailer: graceful:workers:mailer:\S+ removed", result.stderr)
    assert registered(rdb) == []
    assert rdb.llen("jobs") == 0
