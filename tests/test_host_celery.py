"""graceful.celery: real ``celery worker`` processes, a real Redis broker, a real SIGTERM.

Each worker is ``python -c "celery's main()" -A ... worker`` (the ``celery`` command itself),
started by the ``graceful_process`` fixture, which returns once graceful has sent READY=1 at
Celery's ``worker_ready``. The test app (tests/support/celery_app.py) writes ``EV <event> <pid>`` lines
from every process of the worker; the tests read the order of events from them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from graceful.testing import GracefulProcess, NotReadyError

from .conftest import BOUND, ROOT

pytest.importorskip("celery")
redis = pytest.importorskip("redis")

CELERY = "import sys; from celery.__main__ import main; main()"
WORKER_START = 30.0  # seconds: importing Celery and forking the pool is slow on a busy machine


def worker(
    graceful_process: Callable[..., GracefulProcess],
    redis_url: str,
    app: str,
    pool: str,
    **env: str,
) -> GracefulProcess:
    """A ``celery -A app worker`` with ``pool`` (2 processes or threads), ready."""
    args = ["-A", app, "worker", "--pool", pool, "--concurrency", "2", "--loglevel", "INFO"]
    args += ["--without-heartbeat", "--without-gossip", "--without-mingle"]
    path = os.pathsep.join([str(ROOT), str(ROOT / "examples")])
    return graceful_process(
        CELERY,
        env={"CELERY_BROKER_URL": redis_url, "PYTHONPATH": path, **env},
        ready_timeout=WORKER_START,
        args=args,
    )


def send(redis_url: str, name: str, *args: object) -> str:
    """Enqueue task ``name`` (by name: this process never imports the apps); its id."""
    return send_with(redis_url, name, list(args), {})


def send_with(redis_url: str, name: str, args: list[object], kwargs: dict[str, object]) -> str:
    """Enqueue task ``name`` with ``args`` and ``kwargs``; its id."""
    from celery import Celery

    client = Celery("test-client", broker=redis_url)
    try:
        return str(client.send_task(name, args=args, kwargs=kwargs).id)
    finally:
        client.close()


def queued(rdb: redis.Redis, queue: str = "celery") -> list[dict[str, Any]]:
    """The messages waiting on a Celery queue in Redis: each one's headers (task, id, ...) and
    its (args, kwargs)."""
    found = []
    for raw in rdb.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        found.append({**message["headers"], "args": body[0], "kwargs": body[1]})
    return found


def ping(redis_url: str) -> None:
    """Wait (bounded) until the worker's consumer loop answers a remote-control ping."""
    from celery import Celery

    client = Celery("test-client", broker=redis_url)
    try:  # a broadcast sent before the worker subscribed is lost: ask again, one second apart
        answered = any(client.control.ping(timeout=1.0, limit=1) for _ in range(int(BOUND)))
    finally:
        client.close()
    assert answered, f"the worker did not answer a ping within {BOUND} s"


def events(stdout: str) -> dict[int, list[str]]:
    """``EV <event> <pid>`` lines, grouped by process, in the order each process wrote them
    (but ``pool-process``: see ``pool_processes``)."""
    found: dict[int, list[str]] = {}
    for event, pid in re.findall(r"^EV (\S+) (\d+)$", stdout, re.MULTILINE):
        if event != "pool-process":
            found.setdefault(int(pid), []).append(event)
    return found


def pool_processes(stdout: str) -> set[int]:
    """The pids of every pool process the worker started (each says so as it starts)."""
    return {int(pid) for pid in re.findall(r"^EV pool-process (\d+)$", stdout, re.MULTILINE)}


def assert_no_pool_process_outlives(stdout: str) -> None:
    """Each pool process is gone once the worker has exited (waited on through a pidfd, bounded:
    the kernel may still be delivering a SIGKILL; one that outlives it would run on unseen)."""
    pids = pool_processes(stdout)
    assert pids, "the worker reported no pool process"
    left = []
    for pid in sorted(pids):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], BOUND)[0]:
                left.append(pid)
        finally:
            os.close(fd)
    assert not left, f"pool processes still running {BOUND} s after the worker exited: {left}"


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=BOUND) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def queued_ids(rdb: redis.Redis, queue: str = "celery") -> list[str]:
    """The task ids of the messages waiting on a Celery queue in Redis."""
    return [json.loads(raw)["headers"]["id"] for raw in rdb.lrange(queue, 0, -1)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_warm_shutdown_finishes_the_task_in_flight_then_runs_shutdown_listeners(
    graceful_process: Any, redis_url: str, rdb: redis.Redis, pool: str
) -> None:
    """SIGTERM: wrap-up in every process, the task sees it and completes, shutdown after it, exit 0."""
    port = free_port()
    proc = worker(
        graceful_process, redis_url, "tests.support.celery_app", pool, GRACEFUL_PROBE_PORT=str(port)
    )
    assert (probe(port, "/readyz"), probe(port, "/livez")) == (200, 200)
    task_id = send(redis_url, "tests.hold", "k")
    proc.wait_for_output(f"EV accepted-{task_id} {proc.pid}")  # see tests/support/celery_app.py
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_output("EV task-saw-stopping-True")  # is_stopping() inside the running task
    # Still draining: not ready for new work, alive, and it answers without the broker.
    assert (probe(port, "/readyz"), probe(port, "/livez")) == (503, 200)
    rdb.rpush("k:release", "go")
    result = proc.wait(WORKER_START)

    assert result.returncode == 0, result.stderr
    seen = events(result.stdout)
    main = seen.pop(proc.pid)
    main.remove(f"accepted-{task_id}")
    assert main.index("wrap-up") < main.index("shutdown") == len(main) - 1, main
    (task_pid,) = (int(pid) for pid in rdb.lrange("k:done", 0, -1))  # done exactly once
    if pool == "prefork":
        assert len(seen) == 2, seen  # both pool processes were told and ran their listeners
        assert seen[task_pid] == ["task-start", "wrap-up", "task-saw-stopping-True", "task-end", "shutdown"]
        for pid, order in seen.items():
            assert order.index("wrap-up") < order.index("shutdown"), (pid, order)
        # The main process's shutdown listeners ran after the task had ended in its child.
        assert result.stdout.index(f"EV task-end {task_pid}") < result.stdout.index(f"EV shutdown {proc.pid}")
    else:
        assert task_pid == proc.pid
        assert not seen
        assert main == ["task-start", "wrap-up", "task-saw-stopping-True", "task-end", "shutdown"]
    assert "READY=1" in result.notifications
    assert "STOPPING=1" in result.notifications
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_task_that_outlives_the_budget_is_named_with_its_stack_and_put_back(
    graceful_process: Any, redis_url: str, rdb: redis.Redis, pool: str
) -> None:
    """At graceful's deadline: the report names each task and where it is; an acks_late task's
    message is back on the queue; an early-acknowledged one is reported lost with its arguments."""
    proc = worker(graceful_process, redis_url, "tests.support.celery_app", pool, GRACEFUL_FORCE_QUIT="2")
    task_id = send(redis_url, "tests.stuck")
    early_id = send_with(redis_url, "tests.stuck_early", ["x", 1], {"k": "v"})
    for sent in (task_id, early_id):
        proc.wait_for_output(f"EV accepted-{sent} {proc.pid}")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(WORKER_START)

    assert result.returncode == 70, result.stderr
    err = result.stderr
    assert "graceful: force quit: the force-quit deadline of 2 s passed" in err
    cut = "killed mid-run in process " if pool == "prefork" else "cut mid-run in the main process"
    assert f"  - task tests.stuck id {task_id}, {cut}" in err, err
    assert f"celery task tests.stuck[{task_id}] put back on its queue at the deadline" in err
    # Where it is stuck: the task's own line, from the process that runs it.
    assert re.search(r'File ".*celery_app\.py", line \d+, in stuck\n\s+never\.wait\(60\)', err), err
    if pool == "prefork":
        assert f"graceful: celery task tests.stuck id {task_id} in pool process " in err
    assert f"EV shutdown {proc.pid}" not in result.stdout  # forced: its shutdown phase never began
    # Early-acknowledged: lost (at-most-once), named with what it takes to send it again by hand.
    cut = "killed mid-run in process " if pool == "prefork" else "cut mid-run in the main process"
    assert f"  - task tests.stuck_early id {early_id}, {cut}" in err, err
    assert (
        "acknowledged when it started (not acks_late): LOST; to send it again by hand: "
        "tests.stuck_early args=['x', 1] kwargs={'k': 'v'}"
    ) in err
    assert queued_ids(rdb) == [task_id]
    assert rdb.hlen("unacked") == 0  # not left invisible for the visibility timeout
    if pool == "prefork":
        assert_no_pool_process_outlives(result.stdout)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stop", ["QUIT idle", "QUIT", "TERM then QUIT", "INT then INT"])
def test_a_cold_shutdown_stays_celerys_with_the_report_written_at_once(
    graceful_process: Any, redis_url: str, rdb: redis.Redis, stop: str
) -> None:
    """SIGQUIT (or TERM then QUIT, or Ctrl-C twice): the tasks cut are named with their stacks at
    once, then Celery's own cold path ends the worker with its own code, long before graceful's
    deadline (it used to wait for it and exit 70: issue #27)."""
    proc = worker(
        graceful_process, redis_url, "tests.support.celery_app", "prefork", GRACEFUL_FORCE_QUIT="120"
    )
    task_id = None
    if stop == "QUIT idle":
        # Once it answers a ping the consumer's loop runs: a SIGQUIT in the instant after
        # worker_ready crashes plain Celery 5.7 too (its loop finds the pool gone).
        ping(redis_url)
    else:
        task_id = send(redis_url, "tests.stuck") if stop == "QUIT" else send(redis_url, "tests.hold", "k")
        proc.wait_for_output(f"EV accepted-{task_id} {proc.pid}")
    if stop in ("TERM then QUIT", "INT then INT"):
        proc.send_signal(signal.SIGTERM if stop.startswith("TERM") else signal.SIGINT)
        proc.wait_for_output("EV task-saw-stopping-True")  # the warm shutdown is under way
    proc.send_signal(signal.SIGINT if stop == "INT then INT" else signal.SIGQUIT)
    result = proc.wait(WORKER_START)  # graceful's deadline is 120 s away

    # Celery's own code: 0 for a cold shutdown, and for a warm one begun by SIGTERM; 1 once a
    # warm shutdown begun by Ctrl-C has reached its main loop (EX_FAILURE), which the second
    # Ctrl-C may come before. Never graceful's 70.
    assert result.returncode in ((0, 1) if stop == "INT then INT" else (0,)), result.stderr
    err = result.stderr
    assert "force quit" not in err
    assert "worker: Hitting Ctrl+C again will terminate all running tasks!" in result.stdout  # cold
    main = events(result.stdout)[proc.pid]
    assert main.index("wrap-up") < main.index("shutdown"), main  # graceful's listeners ran
    if task_id is None:
        assert "graceful: celery cold shutdown" not in err  # nothing was cut: no report
        return
    name = "tests.stuck" if stop == "QUIT" else "tests.hold"
    assert "graceful: celery cold shutdown: 1 task(s) still running or prefetched" in err, err
    assert f"  - task {name} id {task_id}, process " in err
    assert "Celery cancels it; its message goes back on its queue" in err
    # The stack, from the pool process, before Celery's cold path killed it.
    assert f"graceful: celery task {name} id {task_id} in pool process " in err
    assert re.search(rf'File ".*celery_app\.py", line \d+, in {name[6:]}\n', err), err
    assert queued_ids(rdb) == [task_id]  # Celery put it back; graceful did not add a second copy
    assert rdb.llen("k:done") == 0
    assert_no_pool_process_outlives(result.stdout)


@pytest.mark.timeout(90)
def test_at_the_deadline_a_finished_task_is_acknowledged_and_the_pool_is_stopped_before_anything_goes_back(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """Issue #29: what the main process believes runs is stale at the deadline (it has not read
    the results). A task that finished is acknowledged, never put back; a task still running is
    put back only once its process is gone, so it cannot finish after; no pool process outlives
    the worker."""
    proc = worker(graceful_process, redis_url, "tests.support.celery_app", "prefork", GRACEFUL_FORCE_QUIT="2")
    finished_id = send(redis_url, "tests.linger", "l")
    running_id = send(redis_url, "tests.watch_own_message", "w")
    for sent in (finished_id, running_id):
        proc.wait_for_output(f"EV accepted-{sent} {proc.pid}")
    proc.wait_for_output("EV linger-finished")  # done in its process; its result not sent yet
    proc.wait_for_output("EV watch-start")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(WORKER_START)

    assert result.returncode == 70, result.stderr
    err = result.stderr
    assert "graceful: celery at the deadline: 2 task(s) held; 2 pool process(es) stopped (SIGKILL)" in err, (
        err
    )
    assert (
        f"  - task tests.linger id {finished_id}, finished in process "
        in err.split("graceful: celery at the deadline")[1]
    )
    assert "finished before the deadline: acknowledged now" in err
    assert f"  - task tests.watch_own_message id {running_id}, killed mid-run in process " in err
    assert queued_ids(rdb) == [running_id]  # only the one cut; the finished one is not done twice
    assert rdb.llen("l:done") == 1
    assert rdb.llen("w:done-after-put-back") == 0  # it never saw itself put back: it was gone
    assert rdb.hlen("unacked") == 0
    assert_no_pool_process_outlives(result.stdout)


@pytest.mark.timeout(90)
def test_early_acknowledged_tasks_cut_at_the_deadline_are_sent_again_when_asked(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """GRACEFUL_CELERY_RESEND_EARLY_ACKED=1: an early-acknowledged task cut at the deadline is
    sent again, the same message (name, id, arguments); a task that opts out
    (``graceful_resend_early_acked=False``) is reported lost with its arguments."""
    proc = worker(
        graceful_process,
        redis_url,
        "tests.support.celery_app",
        "prefork",
        GRACEFUL_FORCE_QUIT="2",
        GRACEFUL_CELERY_RESEND_EARLY_ACKED="1",
    )
    again_id = send_with(redis_url, "tests.stuck_early", ["again", 2], {"n": [1, 2]})
    kept_id = send_with(redis_url, "tests.stuck_early_kept", ["kept"], {})
    for sent in (again_id, kept_id):
        proc.wait_for_output(f"EV accepted-{sent} {proc.pid}")
    assert queued(rdb) == []  # both acknowledged as they started
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(WORKER_START)

    assert result.returncode == 70, result.stderr
    err = result.stderr
    assert f"  - task tests.stuck_early id {again_id}, killed mid-run in process " in err, err
    assert "acknowledged when it started (not acks_late): sent again (same id, arguments)" in err
    assert f"  - task tests.stuck_early_kept id {kept_id}, killed mid-run in process " in err
    assert "LOST; to send it again by hand: tests.stuck_early_kept args=['kept'] kwargs={}" in err
    (message,) = queued(rdb)
    assert (message["task"], message["id"], message["args"], message["kwargs"]) == (
        "tests.stuck_early",
        again_id,
        ["again", 2],
        {"n": [1, 2]},
    )
    assert_no_pool_process_outlives(result.stdout)


@pytest.mark.timeout(120)
def test_the_job_iteration_example_checkpoints_and_a_second_worker_finishes_it(
    graceful_process: Any, redis_url: str, rdb: redis.Redis
) -> None:
    """examples/celery_worker.py: SIGTERM mid-job re-enqueues the rest; two runs do every item exactly once."""
    total = 60
    send(redis_url, "process_job", "j", 0, total)
    first = worker(graceful_process, redis_url, "celery_worker", "prefork", ITEM_SECONDS="0.05")
    first.wait_for_output("job j: item 3 done")
    first.send_signal(signal.SIGTERM)
    one = first.wait(WORKER_START)
    assert one.returncode == 0, one.stderr
    stopped_at = re.search(r"job j: stopping before item (\d+) of 60", one.stderr)
    assert stopped_at is not None, one.stderr
    assert 3 < int(stopped_at.group(1)) < total  # it stopped mid-job, not at its end
    assert "job j: finished" not in one.stderr

    second = worker(graceful_process, redis_url, "celery_worker", "prefork", ITEM_SECONDS="0.01")
    second.wait_for_output("job j: finished", WORKER_START)
    second.send_signal(signal.SIGTERM)
    assert second.wait(WORKER_START).returncode == 0

    done = [int(item) for item in rdb.lrange("job:j:done", 0, -1)]
    assert sorted(done) == list(range(total))  # every item, none twice


@pytest.mark.timeout(60)
@pytest.mark.parametrize("problem", ["bad port", "taken port", "bad drain delay", "bad resend switch"])
def test_a_worker_that_cannot_run_graceful_refuses_to_start_and_says_why(
    graceful_process: Any, redis_url: str, problem: str
) -> None:
    """A bad GRACEFUL_* value or a taken probe port: ``celery worker`` exits 1 at start, naming it.

    Celery's signal dispatcher catches what a ``worker_init`` receiver raises: the worker used to
    start without graceful, silently (issue #27).
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env, said = {
            "bad port": ({"GRACEFUL_PROBE_PORT": "80a"}, "GRACEFUL_PROBE_PORT='80a' is not a port number"),
            "taken port": (
                {"GRACEFUL_PROBE_PORT": str(port), "GRACEFUL_PROBE_HOST": "127.0.0.1"},
                f"graceful cannot answer probes on 127.0.0.1:{port}",
            ),
            "bad drain delay": (
                {"GRACEFUL_DRAIN_DELAY": "soon", "GRACEFUL_TERMINATION_GRACE": "30"},
                "GRACEFUL_DRAIN_DELAY='soon': set it to a number of seconds",
            ),
            "bad resend switch": (
                {"GRACEFUL_CELERY_RESEND_EARLY_ACKED": "maybe"},
                "GRACEFUL_CELERY_RESEND_EARLY_ACKED='maybe': set it to 1 (on) or 0 (off), or unset it",
            ),
        }[problem]
        with pytest.raises(NotReadyError) as refused:
            worker(graceful_process, redis_url, "tests.support.celery_app", "prefork", **env)
    message = str(refused.value)
    assert "exited with code 1 before it sent READY=1" in message, message
    assert f"graceful: the celery worker cannot start: {said}" in message, message
    assert "Traceback" not in message  # one sentence, not a stack


def test_install_takes_a_celery_app_and_is_idempotent() -> None:
    """install() refuses what is not a Celery app, and a second call adds nothing."""
    from celery import Celery, signals

    import graceful.celery

    with pytest.raises(TypeError, match=r"celery\.Celery app"):
        graceful.celery.install(object())  # type: ignore[arg-type]
    app = Celery("install-twice", set_as_current=False)
    with pytest.raises(TypeError, match=r"resend_early_acked=\.\.\.\) takes True, False or None, not 'yes'"):
        graceful.celery.install(app, resend_early_acked="yes")  # type: ignore[arg-type]
    before = len(signals.worker_init.receivers)
    graceful.celery.install(app)
    graceful.celery.install(app)
    assert len(signals.worker_init.receivers) == before + 1
