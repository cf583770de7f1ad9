"""graceful.arq: the real ``arq`` command, a real Redis, real signals.

Each worker is ``python -c "arq's cli()" tests.support.arq_app.WorkerSettings`` (the ``arq``
command itself), started by the ``graceful_process`` fixture, which returns once graceful has
sent READY=1 at the end of the worker's ``on_startup``. The app (tests/support/arq_app.py)
writes ``EV <event> <pid>`` lines; the tests read the order of events from them, and what is
queued from Redis (``arq:queue``, a sorted set of job ids).
"""

from __future__ import annotations

import asyncio
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from graceful.testing import GracefulProcess

from .conftest import BOUND
from .support.redis_server import free_port

pytest.importorskip("arq")
redis = pytest.importorskip("redis")

ARQ = "import sys; from arq.cli import cli; sys.exit(cli())"
START = 30.0  # seconds: importing arq and connecting on a busy machine
QUEUE = "arq:queue"


def worker(
    graceful_process: Callable[..., GracefulProcess], redis_url: str, *, wait_ready: bool = True, **env: str
) -> GracefulProcess:
    return graceful_process(
        ARQ,
        env={"ARQ_REDIS_URL": redis_url, **env},
        ready_timeout=START,
        args=["tests.support.arq_app.WorkerSettings"],
        wait_ready=wait_ready,
    )


def enqueue(redis_url: str, function: str, *args: Any) -> str:
    """Enqueue a job by function name (this process never imports the app); its id."""
    from arq import create_pool
    from arq.connections import RedisSettings

    async def send() -> str:
        pool = await create_pool(RedisSettings.from_dsn(redis_url))
        try:
            job = await pool.enqueue_job(function, *args)
            assert job is not None
            return str(job.job_id)
        finally:
            await pool.aclose()

    return asyncio.run(send())


def events(stdout: str) -> list[str]:
    return re.findall(r"^EV (\S+) \d+$", stdout, re.MULTILINE)


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=BOUND) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.mark.timeout(90)
def test_warm_stop_finishes_the_job_in_hand_takes_no_new_one_then_shuts_down(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """SIGTERM: wrap-up, the job sees it and completes, no new job starts, arq's on_shutdown and
    graceful's shutdown listeners after it, exit 0 (plain arq cancels the job at once)."""
    port = free_port()
    proc = worker(graceful_process, redis_url, GRACEFUL_PROBE_PORT=str(port))
    assert (probe(port, "/readyz"), probe(port, "/livez")) == (200, 200)
    enqueue(redis_url, "hold", "k")
    proc.wait_for_output("EV start-k")
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_output("EV saw-stopping-True")  # is_stopping() inside the running job
    assert (probe(port, "/readyz"), probe(port, "/livez")) == (503, 200)
    late = enqueue(redis_url, "note", "late")
    rdb.rpush("k:release", "go")
    result = proc.wait(START)

    assert result.returncode == 0, result.stderr
    seen = events(result.stdout)
    assert seen[:2] == ["arq-on-startup", "start-k"], seen
    # The job wakes as the wrap-up begins, while the wrap-up listeners run: either comes first.
    assert sorted(seen[2:4]) == ["saw-stopping-True", "wrap-up"], seen
    assert seen[4] == "end-k", seen
    assert sorted(seen[5:]) == ["arq-on-shutdown", "shutdown"], seen  # concurrent: both release
    assert rdb.llen("k:done") == 1
    assert rdb.zrange(QUEUE, 0, -1) == [late]  # not taken: for the next worker
    assert "READY=1" in result.notifications
    assert "STOPPING=1" in result.notifications
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(90)
def test_a_job_past_the_deadline_is_named_cancelled_and_run_again_by_the_next_worker(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """At graceful's deadline: the report names the job and where its coroutine is, arq records
    it as cancelled (to run again), ``arq`` exits 70, and the next worker runs it at once."""
    proc = worker(graceful_process, redis_url, GRACEFUL_FORCE_QUIT="2")
    job_id = enqueue(redis_url, "stuck", "s")
    proc.wait_for_output("EV stuck-s")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(START)

    assert result.returncode == 70, result.stderr
    err = result.stderr
    assert "graceful: force quit: the force-quit deadline of 2 s passed" in err
    assert "graceful: arq jobs still running at the deadline: 1" in err
    assert f"arq job {job_id} (stuck), try 1, running for " in err
    assert re.search(r'File ".*arq_app\.py", line \d+, in stuck', err), err
    assert "cancelled at the force-quit deadline; arq runs it again" in err
    assert not rdb.exists(f"arq:in-progress:{job_id}")  # arq recorded it: no wait for the key to expire

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
    """graceful.iteration in a real arq worker: SIGTERM mid-walk, the job sends the rest of
    itself from its cursor, the next worker finishes it: every item done exactly once."""
    total = 40
    enqueue(redis_url, "walk", "w", total)
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
def test_a_failed_listener_makes_arq_exit_1(graceful_process: Any, redis_url: str, rdb: redis.Redis) -> None:
    """The exit code says what happened: a shutdown listener raised, so ``arq`` exits 1."""
    proc = worker(graceful_process, redis_url, APP_FAIL_SHUTDOWN="1")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(START)
    assert result.returncode == 1, result.stderr
    assert "this shutdown listener fails" in result.stderr
    assert "wrap-up" in events(result.stdout)


@pytest.mark.timeout(60)
def test_a_bad_graceful_variable_stops_the_worker_at_start(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """GRACEFUL_PROBE_PORT=abc: the worker does not run without graceful; exit 1, said why."""
    proc = worker(graceful_process, redis_url, wait_ready=False, GRACEFUL_PROBE_PORT="abc")
    result = proc.wait(START)
    assert result.returncode == 1, result.stderr
    assert "graceful: the arq worker cannot start" in result.stderr
    assert "GRACEFUL_PROBE_PORT" in result.stderr
    assert "READY=1" not in result.notifications


def test_install_wraps_the_hooks_once_and_refuses_what_is_not_settings() -> None:
    """install() keeps the user's hooks (it calls them), is idempotent, takes a dict too."""
    import graceful.arq

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["started"] = True

    settings: dict[str, Any] = {"functions": [], "on_startup": startup}
    graceful.arq.install(settings)
    wrapped = settings["on_startup"]
    assert wrapped is not startup
    graceful.arq.install(settings)
    assert settings["on_startup"] is wrapped
    assert {"on_shutdown", "on_job_start", "on_job_end"} <= set(settings)

    class Settings:
        functions: list[Any] = []  # noqa: RUF012

    graceful.arq.install(Settings)
    assert "on_startup" in vars(Settings)  # arq reads the class's own __dict__
    with pytest.raises(TypeError, match="WorkerSettings"):
        graceful.arq.install(object())
    with pytest.raises(TypeError, match="on_job_end must be an async function"):
        graceful.arq.install({"on_job_end": 3})
