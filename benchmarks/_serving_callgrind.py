"""Serving cost, noise-free: instructions per request under callgrind, alone and under graceful.

Why: on a shared 2-core machine the requests/s of two runs a minute apart differ by 10-30 %,
far more than the 2 % the serving benchmark looks for. The instructions a server executes to
answer one request do not depend on the neighbours: ``valgrind --tool=callgrind`` counts them
(user space only: the kernel's share of each request, the same with and without graceful, is
not in the count, so the ratio here is an upper bound of the ratio in time).

The server starts under callgrind with instrumentation off (so start-up is not counted and
runs ~5x faster), answers ``WARM`` requests, then ``callgrind_control`` switches
instrumentation on, one keep-alive connection sends ``REQUESTS`` requests one after another,
and a dump gives the total. Instructions / requests is the figure.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from _harness import BenchError, child_env

WARM = 100
REQUESTS = 400
START_BOUND = 120.0  # s: an interpreter and uvicorn's imports under valgrind, on a loaded machine
CONTROL_BOUND = 60.0
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def _send(port: int, count: int) -> None:
    """``count`` requests on one keep-alive connection, each answered before the next."""
    with socket.create_connection(("127.0.0.1", port), timeout=CONTROL_BOUND) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            sock.sendall(REQUEST)
            answer = b""
            while not (b"\r\n\r\n" in answer and answer.endswith(b"ok")):
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError(f"the server closed the connection; got {answer[:200]!r}")
                answer += chunk


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_BOUND
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if proc.poll() is not None:
            raise BenchError(f"the server exited with {proc.returncode} under callgrind")
        if time.monotonic() > deadline:
            raise BenchError(f"the server did not listen within {START_BOUND:g} s under callgrind")
        time.sleep(0.1)  # polling a port that is not open yet: nothing to wait on


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, timeout=CONTROL_BOUND, check=True)


def _total(directory: Path) -> int:
    total = 0
    for dump in directory.glob("out*"):
        with open(dump, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
    return total


def instructions_per_request(python: str, code: str, port: int) -> float:
    """Instructions (user space, every thread) the server runs per request."""
    with tempfile.TemporaryDirectory(prefix="graceful-callgrind-") as name:
        directory = Path(name)
        proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={directory / 'out'}",
                python,
                "-c",
                code,
            ],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_listening(proc, port)
            _send(port, WARM)
            _control("--instr=on", str(proc.pid))
            _send(port, REQUESTS)
            _control("--dump", str(proc.pid))
        except (OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"callgrind: {exc}") from exc
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        total = _total(directory)
    if not total:
        raise BenchError("callgrind counted nothing")
    return total / REQUESTS
