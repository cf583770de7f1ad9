"""Out-of-process testing: a real child, real signals, readiness over ``NOTIFY_SOCKET``.

Why: a shutdown is only proven where it really happens, in a process that receives a real
signal from the kernel and exits with a real code (a fake can't show the SIGTERM handler is
installed at all, or that the process exits while a thread is stuck). And a test must not
``sleep(1)`` and hope the server is up: the child says READY=1 over systemd's notify protocol
(``graceful.run()`` sends it once every server accepts work) and the test waits for exactly
that, bounded. The public names are re-exported by ``graceful.testing``; POSIX only.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, TypeVar

from ._checks import check_seconds

__all__ = ["GracefulProcess", "NotReadyError", "ProcessFactory", "ProcessResult"]

BOUND = 10.0
"""Seconds: the bound on waits for what should happen at once (pipes closing, exit)."""

Stream = Literal["stdout", "stderr"]
T = TypeVar("T")


class NotReadyError(RuntimeError):
    """The child exited, or stayed silent, before it sent ``READY=1``; the message has its stderr."""


@dataclass(frozen=True)
class ProcessResult:
    """How a child ended: ``returncode`` (negative: killed by that signal), its output as text,
    and ``notifications``: every ``NOTIFY_SOCKET`` message it sent, one entry per line
    (``"READY=1"``, ``"STATUS=..."``), in the order received; a datagram's lines in order."""

    returncode: int
    stdout: str
    stderr: str
    notifications: list[str] = field(default_factory=list)


class _Pipe:
    """Reads one pipe to the end in a thread, decoding UTF-8 as it comes; ``read_to`` is where
    the next ``wait_for_line()`` looks from, ``ended`` says the child closed it."""

    def __init__(self, stream: IO[bytes], changed: threading.Condition) -> None:
        self.text = ""
        self.ended = False
        self.read_to = 0
        self._stream = stream
        self._changed = changed
        self._thread = threading.Thread(target=self._pump, name="graceful-testing-pipe", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            chunk = self._stream.read1(65536)  # type: ignore[attr-defined]
            with self._changed:
                self.text += decoder.decode(chunk, final=not chunk)
                self.ended = not chunk
                self._changed.notify_all()
            if not chunk:
                return

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        # If the thread still reads, a grandchild holds the pipe open: keep what we have.
        if not self._thread.is_alive():
            self._stream.close()

    def next_line(self, text: str, start: int) -> tuple[str | None, int]:
        """The first whole line from ``start`` on that holds ``text`` (or None), and where the
        lines looked at end. Once the pipe ended, a last line without a newline is whole."""
        while (end := self.text.find("\n", start)) >= 0 or (self.ended and start < len(self.text)):
            stop = end if end >= 0 else len(self.text)
            line, start = self.text[start:stop].rstrip("\r"), stop + 1
            if text in line:
                return line, start
        return None, start


class GracefulProcess:
    """A running child, started by ``ProcessFactory``; READY=1 has arrived when you get it
    (unless started with ``wait_ready=False``).

    ``pid``; ``send_signal(sig)``; ``wait(timeout)`` -> ``ProcessResult``; ``wait_for_output``;
    ``wait_for_line`` -> the line; ``send_line`` (with ``stdin=True``); ``kill()``; ``stdout``,
    ``stderr``, ``notifications`` and ``returncode`` so far.
    """

    def __init__(self, argv: list[str], env: dict[str, str], what: str, notify: bool, stdin: bool) -> None:
        self.args = argv
        # Short: AF_UNIX paths max ~100 bytes.
        self._dir = tempfile.mkdtemp(prefix="graceful-")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._wake_r, self._wake_w = os.pipe()
        self._changed = threading.Condition()
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._ready = self._exited = self._closed = False
        self._result: ProcessResult | None = None
        try:
            self._sock.bind(os.path.join(self._dir, "notify"))
            # Without notify, the caller's env names the peer (wait_ready=False).
            if notify:
                env = {**env, "NOTIFY_SOCKET": self._sock.getsockname()}
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
        except BaseException:
            self._release()
            raise
        self.pid = self._proc.pid
        self._label = f"child process ({what}, pid {self.pid})"
        assert self._proc.stdout is not None
        assert self._proc.stderr is not None
        self._out = _Pipe(self._proc.stdout, self._changed)
        self._err = _Pipe(self._proc.stderr, self._changed)
        self._listening = True
        self._listener = threading.Thread(target=self._listen, name="graceful-testing-notify", daemon=True)
        self._listener.start()
        threading.Thread(target=self._reap, name="graceful-testing-reap", daemon=True).start()

    def _release(self) -> None:
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- background ---------------------------------------------------------------------------

    def _reap(self) -> None:
        self._proc.wait()
        with self._changed:
            self._exited = True
            self._changed.notify_all()

    def _listen(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._wake_r in ready:
                    return
                self._received(self._sock.recv(65536))

    def _received(self, datagram: bytes) -> None:
        lines = [line for line in datagram.decode("utf-8", "replace").split("\n") if line]
        with self._changed:
            self._lines.extend(lines)
            self._ready = self._ready or "READY=1" in lines
            self._changed.notify_all()

    def _stop_listening(self) -> None:
        """Stop the listener thread, then read what is left: everything sent before exit."""
        with self._lock:
            if not self._listening:
                return
            self._listening = False
            os.write(self._wake_w, b"x")
            self._listener.join(BOUND)
            self._sock.setblocking(False)
            while True:
                try:
                    self._received(self._sock.recv(65536))
                except OSError:
                    # BlockingIOError: drained.
                    return

    # -- waiting ------------------------------------------------------------------------------

    def _wait_ready(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._ready or self._exited, timeout)
        if self._is_ready():
            return
        if self._exited:
            # READY=1 may have been sent just before the exit.
            self._stop_listening()
            if self._is_ready():
                return
            result = self._collect()
            raise NotReadyError(
                f"{self._label} exited with code {result.returncode} before it sent READY=1"
                f"{_tail('stderr', result.stderr)}"
            )
        self.kill()
        raise NotReadyError(
            f"{self._label} sent no READY=1 within {timeout:g} s, so it was killed. graceful.run() "
            "sends READY=1 once every server has started; a program with its own main loop calls "
            f"graceful.systemd.notify('READY=1') itself.{_tail('stderr', self.stderr)}"
        )

    def _is_ready(self) -> bool:
        with self._changed:
            return self._ready

    def wait(self, timeout: float = BOUND) -> ProcessResult:
        """Wait (bounded) for the child to exit; its ``ProcessResult``. Again: the same result.

        Raises:
            TimeoutError: still running after ``timeout`` s. It is left running (a later
                ``wait()`` may succeed); the fixture kills it at teardown.
        """
        timeout = check_seconds(timeout, "wait()", zero=True, example="10")
        with self._changed:
            exited = self._changed.wait_for(lambda: self._exited, timeout)
        if not exited:
            raise TimeoutError(
                f"{self._label} was still running {timeout:g} s into wait(); it was left running"
                f"{_tail('stderr so far', self.stderr)}"
            )
        return self._collect()

    def wait_for_output(self, text: str, timeout: float = BOUND, *, stream: Stream | None = None) -> None:
        """Wait (bounded) until ``text`` appears on the child's stdout or stderr (``stream``:
        that one only); at once if it is there already.

        Raises:
            TimeoutError: not within ``timeout`` s, or the child exited without writing it.
            ValueError: ``stream`` is not ``"stdout"``, ``"stderr"`` or None.
        """
        pipes = self._pipes(stream, both=True)
        wrote = lambda: True if any(text in pipe.text for pipe in pipes) else None  # noqa: E731
        self._wait_for(wrote, timeout, repr(text), "wait_for_output()")

    def wait_for_line(self, text: str, timeout: float = BOUND, *, stream: Stream = "stdout") -> str:
        """Wait (bounded) for the next whole line on ``stream`` that holds ``text``; that line,
        without its line ending. Each call looks on from after the line the last call on that
        stream returned (as pexpect's ``expect``): two calls find two lines.

        Raises:
            TimeoutError: no such line within ``timeout`` s, or the child exited without one.
            ValueError: ``stream`` is not ``"stdout"`` or ``"stderr"``.
        """
        (pipe,) = self._pipes(stream, both=False)
        scan = pipe.read_to

        def next_line() -> str | None:
            """Called with ``self._changed`` held: the text does not grow meanwhile."""
            nonlocal scan
            line, scan = pipe.next_line(text, scan)
            if line is not None:
                pipe.read_to = scan
            return line

        return self._wait_for(next_line, timeout, f"a line with {text!r} on {stream}", "wait_for_line()")

    def _pipes(self, stream: object, *, both: bool) -> tuple[_Pipe, ...]:
        pipes: dict[object, tuple[_Pipe, ...]] = {"stdout": (self._out,), "stderr": (self._err,)}
        if both:
            pipes[None] = (self._out, self._err)
        if stream not in pipes:
            raise ValueError(f"stream is 'stdout' or 'stderr'{' (or None)' * both}, not {stream!r}")
        return pipes[stream]

    def _wait_for(self, found: Callable[[], T | None], timeout: float, what: str, call: str) -> T:
        """``found()``'s first value that is not None (it is called with ``_changed`` held)."""
        timeout = check_seconds(timeout, call, zero=True, example="10")
        box: list[T] = []

        def done() -> bool:
            if not box and (value := found()) is not None:
                box.append(value)
            return bool(box) or self._exited

        with self._changed:
            self._changed.wait_for(done, timeout)
        if not box and self._exited:
            # The pipes may still hold what it wrote just before it exited.
            self._collect()
            with self._changed:
                done()
        if box:
            return box[0]
        raise TimeoutError(
            f"{self._label} did not write {what} within {timeout:g} s"
            f"{' (it exited)' if self._exited else ''}"
            f"{_tail('stdout', self.stdout)}{_tail('stderr', self.stderr)}"
        )

    def _collect(self) -> ProcessResult:
        if self._result is None:
            for pipe in (self._out, self._err):
                pipe.join(BOUND)
            self._close_stdin()
            self._stop_listening()
            code = self._proc.returncode
            # The reaper has seen the exit.
            assert code is not None
            with self._changed:
                self._result = ProcessResult(code, self._out.text, self._err.text, list(self._lines))
        return self._result

    # -- acting -------------------------------------------------------------------------------

    def send_signal(self, sig: int) -> bool:
        """Send a real signal; False (and nothing sent) if the child has already exited."""
        if self._exited or self._proc.poll() is not None:
            return False
        self._proc.send_signal(sig)
        return True

    def send_line(self, line: str) -> bool:
        """Write ``line`` and a newline to the child's stdin, flushed; False (nothing written) if
        it has exited or closed its stdin.

        Raises:
            RuntimeError: it was started without ``stdin=True``: its stdin is ``/dev/null``.
        """
        if (stdin := self._proc.stdin) is None:
            raise RuntimeError(f"{self._label} has no stdin: start it with graceful_process(..., stdin=True)")
        if self._exited or self._proc.poll() is not None:
            return False
        try:
            stdin.write(line.encode("utf-8") + b"\n")
            stdin.flush()
        except (BrokenPipeError, ValueError):
            # It closed its stdin (or exited); we closed ours.
            return False
        return True

    def _close_stdin(self) -> None:
        if self._proc.stdin is not None:
            # A dead child's pipe: broken on the final flush.
            with contextlib.suppress(OSError):
                self._proc.stdin.close()

    def kill(self) -> bool:
        """SIGKILL the child if it still runs, and collect it; True if it was still running."""
        running = self.send_signal(signal.SIGKILL)
        with self._changed:
            self._changed.wait_for(lambda: self._exited, BOUND)
        self._collect()
        return running

    def close(self) -> str | None:
        """Kill if running, release the socket; a sentence if it had to be killed. Idempotent."""
        if self._closed:
            return None
        self._closed = True
        running = self.kill() if self._result is None else False
        self._release()
        if not running:
            return None
        return (
            f"{self._label} was still running at the end of the test: killed it{_tail('stderr', self.stderr)}"
        )

    # -- so far -------------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited, else None."""
        return self._proc.returncode if self._exited else None

    @property
    def stdout(self) -> str:
        return self._out.text

    @property
    def stderr(self) -> str:
        return self._err.text

    @property
    def notifications(self) -> list[str]:
        """The notify lines received so far (see ``ProcessResult.notifications``)."""
        with self._changed:
            return list(self._lines)

    def __repr__(self) -> str:
        return f"<graceful.testing.GracefulProcess {self._label} returncode={self.returncode}>"


def _tail(what: str, text: str, limit: int = 4000) -> str:
    if not text:
        return f"; its {what} was empty"
    cut = text if len(text) <= limit else "...\n" + text[-limit:]
    return f"; its {what}:\n{cut.rstrip()}"


class ProcessFactory:
    """Starts children and cleans up after them; what the ``graceful_process`` fixture returns.

    ``factory(code_or_path, env=None, ready_timeout=10, args=())`` starts ``python`` on a
    script (a ``Path``, or a one-line ``str`` ending in ``.py``) or on code (any other
    ``str``, dedented), with ``NOTIFY_SOCKET`` pointing at a datagram socket it listens on, and
    returns a ``GracefulProcess`` once ``READY=1`` has arrived. ``env`` is added to this
    process's environment (``PYTHONUNBUFFERED=1`` and ``PYTHONIOENCODING=utf-8`` are set
    unless ``env`` says otherwise). ``close()`` kills whatever still runs and names it.
    """

    def __init__(self) -> None:
        self._children: list[GracefulProcess] = []

    def __call__(
        self,
        code_or_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        ready_timeout: float = BOUND,
        *,
        args: Sequence[str] = (),
        wait_ready: bool = True,
        stdin: bool = False,
    ) -> GracefulProcess:
        """Start a child and wait until it is ready; see the class docstring.

        Args:
            wait_ready: False returns once the child started, without waiting for ``READY=1``:
                for a program that never sends it, or a test of what comes before. ``env``
                may then set ``NOTIFY_SOCKET`` (a test that is the notify peer itself).
            stdin: True gives the child a pipe as stdin, for ``send_line()``; else /dev/null.

        Raises:
            NotReadyError: it exited first, or sent no READY=1 within ``ready_timeout`` s
                (it is killed then); the message carries its stderr.
            ValueError: a script path that does not exist, a bad timeout, or ``env`` sets
                ``NOTIFY_SOCKET`` while ``wait_ready`` is True (the factory listens on it).
            TypeError: ``code_or_path`` is neither a ``str`` nor a path.
            RuntimeError: not on a POSIX system.
        """
        if not hasattr(socket, "AF_UNIX") or sys.platform == "win32":
            raise RuntimeError("graceful_process needs POSIX (AF_UNIX datagram sockets); skip on Windows")
        ready_timeout = check_seconds(
            ready_timeout, "graceful_process(ready_timeout=...)", zero=True, example="10"
        )
        own_notify = env is None or "NOTIFY_SOCKET" not in env
        if wait_ready and not own_notify:
            raise ValueError(
                "graceful_process sets NOTIFY_SOCKET itself (to listen for READY=1): drop it from env, "
                "or pass wait_ready=False to have the child notify a peer of your own"
            )
        argv, what = _command(code_or_path, list(args))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", **(env or {})}
        child = GracefulProcess(argv, full_env, what, own_notify, stdin)
        self._children.append(child)
        if wait_ready:
            child._wait_ready(ready_timeout)
        return child

    def close(self) -> str | None:
        """Kill every child still running and free their sockets; a report naming them, or None."""
        problems = [problem for child in self._children if (problem := child.close()) is not None]
        self._children.clear()
        return "graceful_process: " + "\ngraceful_process: ".join(problems) if problems else None


def _command(code_or_path: object, args: list[str]) -> tuple[list[str], str]:
    if isinstance(code_or_path, os.PathLike) or (
        isinstance(code_or_path, str) and "\n" not in code_or_path and code_or_path.strip().endswith(".py")
    ):
        path = Path(os.fspath(code_or_path)).expanduser()
        if not path.is_file():
            raise ValueError(
                f"graceful_process: no script at {str(path)!r}; pass a path to a .py file, or code"
            )
        return [sys.executable, str(path), *args], path.name
    if isinstance(code_or_path, str):
        code = textwrap.dedent(code_or_path)
        first = next((line.strip() for line in code.splitlines() if line.strip()), "")
        return [sys.executable, "-c", code, *args], f"python -c {first[:40]!r}..."
    raise TypeError(
        f"graceful_process() takes Python code (str) or a script path, not {type(code_or_path).__name__}"
    )
