"""How a Celery worker ends on each stop path, plain Celery beside ``graceful.celery``.

    python benchmarks/celery_stops.py                    # every case, 3 runs each, budget 10 s
    python benchmarks/celery_stops.py --runs 5 --only QUIT --only "TERM then QUIT"

Each run starts ``celery -A _celery_stops_app worker --pool prefork -c 2`` on its own Redis
(a ``redis-server`` on PATH, on 127.0.0.1), waits until its consumer answers a ping, gives it a
30 s ``acks_late`` task when the case is busy (and waits until the task runs), sends the
case's signals, and takes the time from the first signal to the exit, the exit code, and how
many of the worker's pool processes were still alive 0.5 s after it exited (they are then
killed). Plain and graceful runs alternate, so noise falls on both alike; the figures are
medians, and only the ratios within one run mean anything (issues #27 and #29).

Cases: ``QUIT`` (idle and busy), ``TERM then QUIT`` and ``INT then INT`` (0.5 s apart, busy),
and ``TERM, deadline`` (busy, graceful's budget ``--deadline`` s: what graceful does when its
deadline passes; plain Celery waits for the task, bounded by the driver at 40 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CELERY = "import sys; from celery.__main__ import main; sys.exit(main())"
BOUND = 40.0


@dataclass(frozen=True)
class Case:
    name: str
    signals: tuple[signal.Signals, ...]
    busy: bool
    deadline: bool = False


CASES = [
    Case("QUIT, idle", (signal.SIGQUIT,), busy=False),
    Case("QUIT, a task running", (signal.SIGQUIT,), busy=True),
    Case("TERM then QUIT", (signal.SIGTERM, signal.SIGQUIT), busy=True),
    Case("INT then INT", (signal.SIGINT, signal.SIGINT), busy=True),
    Case("TERM, deadline", (signal.SIGTERM,), busy=True, deadline=True),
]


def start_redis(folder: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        sys.exit("celery_stops: no redis-server on PATH")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            folder,
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    sys.exit("celery_stops: redis-server did not answer")


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def one_run(case: Case, plain: bool, url: str, budget: float, deadline: float) -> tuple[float, int, int]:
    """Seconds from the first signal to the exit, the exit code, pool processes left alive."""
    import redis
    from celery import Celery

    redis.Redis.from_url(url).flushdb()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
        "CELERY_BROKER_URL": url,
        "STOPS_PLAIN": "1" if plain else "0",
        "GRACEFUL_FORCE_QUIT": str(deadline if case.deadline else budget),
    }
    args = [
        "-A",
        "_celery_stops_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--loglevel",
        "INFO",
    ]
    args += ["--without-heartbeat", "--without-gossip", "--without-mingle"]
    proc = subprocess.Popen(
        [sys.executable, "-c", CELERY, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ready, started = threading.Event(), threading.Event()
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if " ready." in line:
                ready.set()
            if "BUSY-START" in line:
                started.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    client = Celery("celery-stops", broker=url)
    try:
        return _stop(case, proc, client=client, ready=ready, started=started, lines=lines, reader=reader)
    finally:
        client.close()
        if proc.poll() is None:  # it failed before its stop: leave nothing behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stop(
    case: Case,
    proc: subprocess.Popen[str],
    *,
    client: Any,
    ready: threading.Event,
    started: threading.Event,
    lines: list[str],
    reader: threading.Thread,
) -> tuple[float, int, int]:
    # Ready, then a ping answered: its consumer's loop runs (a broadcast sent before the worker
    # subscribed is lost, hence the retries).
    if not ready.wait(30) or not any(client.control.ping(timeout=1, limit=1) for _ in range(30)):
        raise RuntimeError("the worker did not answer a ping:\n" + "".join(lines[-30:]))
    if case.busy:
        client.send_task("stops.busy", args=[30])
        if not started.wait(30):
            raise RuntimeError("the task did not start:\n" + "".join(lines[-30:]))
    pool = children_of(proc.pid)
    t0 = time.monotonic()
    for i, sig in enumerate(case.signals):
        if i:
            time.sleep(0.5)
        proc.send_signal(sig)
    try:
        code = proc.wait(BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    took = time.monotonic() - t0
    reader.join(5)
    time.sleep(0.5)
    left = [pid for pid in pool if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return took, code, len(left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--budget", type=float, default=10.0, help="GRACEFUL_FORCE_QUIT (s) of the cold cases"
    )
    parser.add_argument(
        "--deadline", type=float, default=2.0, help="GRACEFUL_FORCE_QUIT (s) of 'TERM, deadline'"
    )
    parser.add_argument("--only", action="append", help="a case name (repeatable)")
    options = parser.parse_args()
    cases = [case for case in CASES if not options.only or case.name in options.only]
    with tempfile.TemporaryDirectory() as folder:
        server, url = start_redis(folder)
        try:
            print("| case | worker | stop -> exit, median (min-max) | exit codes | pool processes left |")
            print("|---|---|---|---|---|")
            for case in cases:
                results: dict[bool, list[tuple[float, int, int]]] = {True: [], False: []}
                for _ in range(options.runs):
                    for plain in (True, False):
                        results[plain].append(one_run(case, plain, url, options.budget, options.deadline))
                for plain in (True, False):
                    runs = results[plain]
                    times = [took for took, _, _ in runs]
                    codes = ", ".join(str(code) for _, code, _ in runs)
                    budget = options.deadline if case.deadline else options.budget
                    who = "plain Celery" if plain else f"graceful.celery (budget {budget:g} s)"
                    print(
                        f"| {case.name} | {who} | {statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f}) "
                        f"| {codes} | {sum(left for _, _, left in runs)} |",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
