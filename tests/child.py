"""A child Python process driven line by line: for tests that send real signals."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field

from .conftest import BOUND, ROOT

# What the server programs of the adapter tests share: graceful's log lines on stderr, an event
# ``release`` that the test sets by writing a line to the child's stdin (``Child.tell``), and
# ``say(line)``, which prints one whole line even when handlers print from many threads.
PREAMBLE = r"""
import logging, sys, threading
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
release = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), release.set()), daemon=True).start()
_printing = threading.Lock()

def say(line):
    with _printing:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
"""


@dataclass
class Child:
    """Runs ``code`` with ``python -c``; stdout lines are queued as they come."""

    code: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] = field(init=False)
    lines: queue.Queue[str | None] = field(init=False, default_factory=queue.Queue)
    stdout: list[str] = field(init=False, default_factory=list)
    stderr: list[str] = field(init=False, default_factory=list)
    _err_changed: threading.Condition = field(init=False, default_factory=threading.Condition)
    _pumps: list[threading.Thread] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(self.code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._pumps = [
            threading.Thread(target=self._pump_out, daemon=True),
            threading.Thread(target=self._pump_err, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._err_changed:
                self.stderr.append(line)
                self._err_changed.notify_all()
        with self._err_changed:
            self.stderr.append("")
            self._err_changed.notify_all()

    def expect_err(self, text: str, timeout: float = BOUND) -> None:
        """Wait (bounded) until stderr contains ``text``."""
        with self._err_changed:
            ok = self._err_changed.wait_for(lambda: text in self.err or self.proc.poll() is not None, timeout)
        if not ok or text not in self.err:
            raise AssertionError(f"stderr never showed {text!r}; stderr:\n{self.err}")

    def expect(self, text: str, timeout: float = BOUND) -> str:
        """Wait (bounded) for a stdout line containing ``text``; AssertionError otherwise."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no line with {text!r} within {timeout} s; stderr:\n{self.err}"
                ) from None
            if line is None:
                raise AssertionError(f"child ended before printing {text!r}; stderr:\n{self.err}")
            if text in line:
                return line

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = BOUND) -> int:
        try:
            code = self.proc.wait(timeout)
            for pump in self._pumps:
                pump.join(BOUND)
            return code
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(BOUND)
            raise AssertionError(f"child did not exit within {timeout} s; stderr:\n{self.err}") from None

    @property
    def out(self) -> str:
        return "".join(self.stdout)

    @property
    def err(self) -> str:
        return "".join(self.stderr)

    def kill(self) -> None:
        """Kill if still running, then close the pipes (teardown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(BOUND)
        for pump in self._pumps:
            pump.join(BOUND)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):  # stdin of a dead child: broken pipe on flush
                    stream.close()
