"""The rq adapter: a real rq.SimpleWorker, a real redis-server, real signals.

The jobs are below (rq workers import them by name): ``slow(name)`` pushes ``name`` on the
list ``started`` and waits for an item on ``release``; ``spin`` runs Python code until rq's
job timeout stops it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

import graceful
from graceful import Lifecycle
from graceful._service import Context
from graceful.adapters import adapt
from graceful.testing import GracefulProcess, ProcessFactory

from .conftest import BOUND

redis = pytest.importorskip("redis")
rq = pytest.importorskip("rq")
from rq.registry import FailedJobRegistry, StartedJobRegistry  # noqa: E402 - after the skip

from graceful.adapters.rq import RqService  # noqa: E402 - after the skip: it imports rq

WORKER = r"""
import logging, os, sys, threading
import redis, rq
import graceful
from graceful.adapters.heartbeat import Registration

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
connection = redis.Redis.from_url(sys.argv[1])
worker = rq.SimpleWorker([rq.Queue("default", connection=connection)], connection=connection, name="w1")
if os.environ.get("LOSE_THE_UNSUBSCRIBE_RACE"):
    # What a busy machine does now and then, every time: rq's pub/sub thread handles the
    # UNSUBSCRIBE reply before anyone has told it to stop (issue #27).
    subscribe = worker.subscribe

    def subscribe_then_lose_the_race():
        subscribe()
        pubsub = worker.pubsub
        unsubscribe = pubsub.unsubscribe

        def unsubscribe_and_let_the_thread_see_the_reply(*args, **kwargs):
            done = unsubscribe(*args, **kwargs)
            pause = threading.Event()
            for _ in range(1000):  # polling: redis-py has no event for "unsubscribed"
                if not pubsub.subscribed:
                    break
                pause.wait(0.005)
            print("UNSUBSCRIBE handled by the pub/sub thread", flush=True)
            return done

        pubsub.unsubscribe = unsubscribe_and_let_the_thread_see_the_reply

    worker.subscribe = subscribe_then_lose_the_race
if os.environ.get("SLOW_SUBSCRIBE"):  # a slow Redis: rq's bootstrap takes a while to subscribe
    subscribe_now = worker.subscribe
    worker.subscribe = lambda: (threading.Event().wait(float(os.environ["SLOW_SUBSCRIBE"])), subscribe_now())
sys.exit(graceful.run([worker, Registration(connection, "rq-w1", ttl=3)]))
"""


SLOW = "tests.test_adapter_rq.slow"


def slow(name: str) -> str:
    """Say it started (a Redis list the test waits on), then wait for the test's go-ahead."""
    with redis.Redis.from_url(os.environ["RQ_TEST_REDIS"], socket_timeout=3 * BOUND) as client:
        client.rpush("started", name)
        client.blpop(["release"], timeout=2 * BOUND)
    return f"done {name}"


def spin() -> None:
    """A job that runs Python code (not blocked in C) until rq's timeout stops it."""
    tick = threading.Event()
    while True:
        tick.wait(0.01)


@pytest.fixture
def queue(rdb: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[rq.Queue]:
    monkeypatch.setenv("RQ_TEST_REDIS", redis_url)  # for the jobs, in this process and in children
    connection = redis.Redis.from_url(redis_url)
    yield rq.Queue("default", connection=connection)
    connection.close()


def start(graceful_process: ProcessFactory, url: str, **env: str) -> GracefulProcess:
    code = f"import sys; sys.argv = ['worker', {url!r}]\n" + WORKER
    child = graceful_process(code, env={"RQ_TEST_REDIS": url, **env})  # the jobs' Redis
    child.wait_for_output("server(s) started: ready", stream="stderr")
    return child


def wait_started(client: redis.Redis, name: str, child: GracefulProcess) -> None:
    got = client.blpop(["started"], timeout=BOUND)
    assert got is not None, f"the job never started; the worker said:\n{child.stderr}"
    assert got[1] == name


def registered(client: redis.Redis) -> list[str]:
    return sorted(client.keys("graceful:workers:rq-w1:*"))


def wait_blocked_in_dequeue(client: redis.Redis) -> None:
    """Until a client of the server (the idle worker) is blocked in BLMOVE/BLPOP."""
    pause = threading.Event()
    for _ in range(int(BOUND / 0.01)):
        if any(c.get("cmd") in ("blmove", "blpop") for c in client.client_list()):
            return
        pause.wait(0.01)  # polling Redis: there is no event to wait on
    raise AssertionError("the worker never blocked in its dequeue")


def burst(fresh: Lifecycle, queue: rq.Queue) -> rq.SimpleWorker:
    """Run an rq.SimpleWorker in this process until its queue is empty."""
    worker = rq.SimpleWorker([queue], connection=queue.connection)
    assert graceful.run(RqService(worker, burst=True)) == 0
    return worker


@pytest.mark.timeout(60)
def test_a_job_in_flight_at_sigterm_completes(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str, queue: rq.Queue
) -> None:
    child = start(graceful_process, redis_url)
    job = queue.enqueue(SLOW, "one")
    wait_started(rdb, "one", child)
    assert len(registered(rdb)) == 1
    child.send_signal(signal.SIGTERM)
    child.wait_for_output(f"warm shutdown: no new job; job {job.id} in hand", stream="stderr")
    later = queue.enqueue(SLOW, "later")
    rdb.rpush("release", 1)
    assert child.wait().returncode == 0, child.stderr
    job.refresh()
    assert job.get_status() == "finished"
    assert job.return_value() == "done one"
    assert queue.job_ids == [later.id]  # not taken after the wrap-up
    assert rq.Worker.all(connection=queue.connection) == []  # rq's own registration is gone
    assert registered(rdb) == []  # and graceful's, after the drain


@pytest.mark.timeout(60)
def test_a_job_in_flight_at_the_deadline_is_back_on_the_queue_and_runs_again(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str, queue: rq.Queue, fresh: Lifecycle
) -> None:
    child = start(graceful_process, redis_url, GRACEFUL_FORCE_QUIT="1")
    first = queue.enqueue(SLOW, "first")
    job = queue.enqueue(SLOW, "stuck")
    rdb.rpush("release", 1)  # for "first" only
    wait_started(rdb, "first", child)
    wait_started(rdb, "stuck", child)
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 70
    assert queue.job_ids == [job.id]  # back on its queue
    assert job.get_status() == "queued"
    assert job.id not in StartedJobRegistry("default", connection=queue.connection)
    assert job.id not in FailedJobRegistry("default", connection=queue.connection)
    assert f"job {job.id} ({SLOW}) still running at the force-quit deadline" in child.stderr
    assert rq.Worker.all(connection=queue.connection) == []
    assert registered(rdb) == []
    assert first.get_status() == "finished"

    rdb.rpush("release", 1)
    burst(fresh, queue)  # the next worker runs it: nothing was lost
    assert job.get_status() == "finished"
    assert job.return_value() == "done stuck"


@pytest.mark.timeout(60)
def test_an_idle_worker_blocked_in_its_dequeue_stops_within_a_second_or_two(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    child = start(graceful_process, redis_url)
    wait_blocked_in_dequeue(rdb)
    child.send_signal(signal.SIGTERM)
    child.wait_for_output("warm shutdown: no new job; idle", stream="stderr")
    assert child.wait(5).returncode == 0, child.stderr


@pytest.mark.timeout(60)
def test_a_worker_stopped_just_after_ready_exits_0_though_rq_loses_its_unsubscribe_race(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    """rq's teardown under redis-py 8 waited up to 60 s for its pub/sub thread: now bounded."""
    child = start(graceful_process, redis_url, LOSE_THE_UNSUBSCRIBE_RACE="1", GRACEFUL_FORCE_QUIT="8")
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("UNSUBSCRIBE handled by the pub/sub thread")
    result = child.wait(5)
    assert result.returncode == 0, result.stderr
    assert "still running" not in result.stderr, result.stderr
    assert "unsubscribing from channel rq:pubsub:w1" in result.stderr, result.stderr
    assert rq.Worker.all(connection=rdb) == []
    assert rdb.pubsub_numsub("rq:pubsub:w1") == [("rq:pubsub:w1", 0)]


@pytest.mark.timeout(60)
def test_ready_comes_once_the_worker_listens_for_rq_commands(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str
) -> None:
    """At READY rq has subscribed to the worker's command channel (rq shutdown, stop-job)."""
    child = start(graceful_process, redis_url, SLOW_SUBSCRIBE="0.5")
    assert rdb.pubsub_numsub("rq:pubsub:w1") == [("rq:pubsub:w1", 1)], child.stderr
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0, child.stderr


@pytest.mark.timeout(60)
def test_sigtstp_stops_taking_jobs_and_keeps_the_process_up_until_sigterm(
    graceful_process: ProcessFactory, rdb: redis.Redis, redis_url: str, queue: rq.Queue
) -> None:
    child = start(graceful_process, redis_url)
    child.send_signal(signal.SIGTSTP)
    child.wait_for_output("server 'rq w1' stopped", stream="stderr")
    job = queue.enqueue(SLOW, "during-the-pause")
    assert child.returncode is None
    assert len(registered(rdb)) == 1  # paused, still here
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0, child.stderr
    assert queue.job_ids == [job.id]  # never taken


@pytest.mark.timeout(30)
def test_job_timeouts_work_in_the_worker_thread(fresh: Lifecycle, queue: rq.Queue) -> None:
    job = queue.enqueue(spin, job_timeout=1)
    burst(fresh, queue)
    assert job.get_status() == "failed"
    result = job.latest_result()
    assert result is not None
    assert result.exc_string is not None
    assert "JobTimeoutException" in result.exc_string  # not "signal only works in main thread"


@pytest.mark.timeout(30)
def test_a_stop_that_came_before_serve_is_not_lost(fresh: Lifecycle, queue: rq.Queue) -> None:
    job = queue.enqueue(spin)
    service = RqService(rq.SimpleWorker([queue], connection=queue.connection))
    fresh.wrap_up("paused while starting")
    service.serve(Context(fresh, service.name))  # returns without taking a job
    assert queue.job_ids == [job.id]
    assert rq.Worker.all(connection=queue.connection) == []


def test_adapt_picks_the_rq_adapter_for_a_simple_worker_and_explains_the_rest(queue: rq.Queue) -> None:
    connection = queue.connection
    worker = rq.SimpleWorker([queue], connection=connection)
    service = adapt(worker)
    assert isinstance(service, RqService)
    assert type(worker) is rq.SimpleWorker  # only the instance is adjusted
    with pytest.raises(TypeError, match=r"graceful runs rq\.SimpleWorker, not Worker.*rq worker"):
        adapt(rq.Worker([queue], connection=connection))
    with pytest.raises(TypeError, match="SimpleWorker"):
        RqService(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheduler"):
        RqService(rq.SimpleWorker([queue], connection=connection), with_scheduler=True)
    with pytest.raises(TypeError, match="unknown work"):
        RqService(rq.SimpleWorker([queue], connection=connection), bust=True)
