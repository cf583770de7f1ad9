"""The rq adapter: a real rq worker, a real redis-server, real signals."""

from __future__ import annotations

import signal

import pytest
import redis
import rq

from graceful.adapters import adapt
from graceful.adapters.rq import RqService

from .child import Child
from .conftest import BOUND

WORKER = r"""
import logging, sys
import redis, rq
import graceful

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
connection = redis.Redis.from_url(sys.argv[1])
worker = rq.SimpleWorker([rq.Queue("default", connection=connection)], connection=connection, name="w1")
sys.exit(graceful.run(worker))
"""


def start(children: list[Child], url: str, **env: str) -> Child:
    code = f"import sys; sys.argv = ['worker', {url!r}]\n" + WORKER
    child = Child(code, env={"RQ_TEST_REDIS": url, **env})
    children.append(child)
    child.expect_err("server(s) started: ready")
    return child


def wait_started(client: redis.Redis, name: str, child: Child) -> None:
    got = client.blpop(["started"], timeout=BOUND)
    assert got is not None, f"the job never started; the worker said:\n{child.err}"
    assert got[1] == name


@pytest.mark.timeout(60)
def test_a_job_in_flight_at_sigterm_completes(
    children: list[Child], rdb: redis.Redis, redis_url: str
) -> None:
    queue = rq.Queue("default", connection=redis.Redis.from_url(redis_url))
    child = start(children, redis_url)
    job = queue.enqueue("tests.rq_jobs.slow", "one")
    wait_started(rdb, "one", child)
    child.send(signal.SIGTERM)
    child.expect_err("warm shutdown: no new job; job")
    rdb.rpush("release", 1)
    assert child.wait() == 0
    job.refresh()
    assert job.get_status() == "finished"
    assert job.return_value() == "done one"
    assert rq.Worker.all(connection=queue.connection) == []  # rq's own registration is gone


@pytest.mark.timeout(60)
def test_a_job_in_flight_at_the_deadline_is_back_on_the_queue(
    children: list[Child], rdb: redis.Redis, redis_url: str
) -> None:
    queue = rq.Queue("default", connection=redis.Redis.from_url(redis_url))
    child = start(children, redis_url, GRACEFUL_FORCE_QUIT="1")
    job = queue.enqueue("tests.rq_jobs.slow", "stuck")
    wait_started(rdb, "stuck", child)
    child.send(signal.SIGTERM)
    assert child.wait() == 70
    assert queue.job_ids == [job.id]  # back at the front of its queue
    assert job.id not in rq.registry.StartedJobRegistry("default", connection=queue.connection)
    assert f"job {job.id} (tests.rq_jobs.slow) still running at the force-quit deadline" in child.err
    assert rq.Worker.all(connection=queue.connection) == []


@pytest.mark.timeout(60)
def test_an_idle_worker_stops_within_a_second_of_sigterm(children: list[Child], redis_url: str) -> None:
    child = start(children, redis_url)
    child.send(signal.SIGTERM)
    child.expect_err("warm shutdown: no new job; idle")
    assert child.wait(5) == 0, child.err


def test_adapt_picks_the_rq_adapter(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    worker = rq.SimpleWorker([rq.Queue("default", connection=connection)], connection=connection)
    service = adapt(worker)
    assert isinstance(service, RqService)
    assert type(worker) is rq.SimpleWorker  # its class is pickled for rq's horses: left alone
    with pytest.raises(TypeError, match="rq worker"):
        RqService(object())  # type: ignore[arg-type]
    connection.close()
