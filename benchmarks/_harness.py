"""What every benchmark shares: the interpreter, the child environment, readiness, timing, stats.

Why it is built this way:

* Every contender runs under the *same* interpreter and environment in one run: the peers'
  virtual environment (``benchmarks/.peers``) with ``PYTHONPATH`` pointing at this checkout, so
  ``graceful`` comes from the repo and the peers from PyPI, and no contender pays for another's
  ``.pth`` files. ``--quick`` uses the current interpreter and runs only graceful and the
  bare baseline.
* ``PYTHONDONTWRITEBYTECODE`` is removed from the children's environment (this machine sets
  it, and then every import compiles from source), and so are the variables that would make a
  child run under coverage or send its READY=1 somewhere else.
* A child says it is ready with a line on stdout that starts with ``ready`` or, for
  ``graceful.run()``, with READY=1 on ``NOTIFY_SOCKET`` (the systemd protocol graceful speaks).
* Exit is seen through a pidfd where the kernel has one (Linux >= 5.3): ``Popen.wait(timeout)``
  polls with sleeps of up to 50 ms, far too coarse for a figure measured in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "benchmarks" / ".peers"
# websockets: uvicorn's WebSocket protocol and the long-lived benchmark's client; aiohttp: the
# server graceful's aiohttp adapter drives there; gunicorn: the rolling rig's peers; celery with
# its Redis transport (kombu's redis extra: the client and packaging): the hung-listener section.
# Pip requirements, and the module each one provides.
PEER_PACKAGES = (
    "aiomisc",
    "cotyledon",
    "uvicorn",
    "grpcio",
    "websockets",
    "aiohttp",
    "gunicorn",
    "celery[redis]",
    "redis",
)
PEER_MODULES = (
    "aiomisc",
    "cotyledon",
    "uvicorn",
    "grpc",
    "websockets",
    "aiohttp",
    "gunicorn",
    "celery",
    "redis",
)
READY_BOUND = 30.0  # seconds a child may take to start on a loaded machine
_DROP = ("PYTHONDONTWRITEBYTECODE", "NOTIFY_SOCKET", "GRACEFUL_FORCE_QUIT", "PYTHONPATH", "PYTHONSTARTUP")


class BenchError(RuntimeError):
    """A child did not behave: it crashed, never got ready, or never exited."""


@dataclass
class Setup:
    """What one run uses: the interpreter for every child, and which contenders it may run."""

    python: str
    quick: bool
    peers: dict[str, str] = field(default_factory=dict)  # module -> version, empty in --quick

    def has(self, module: str) -> bool:
        return module in self.peers

    def adapter_landed(self, name: str) -> bool:
        """The adapter exists, as a module or as a package (gRPC is one)."""
        adapters = ROOT / "graceful" / "adapters"
        return (adapters / f"{name}.py").exists() or (adapters / name / "__init__.py").exists()


@dataclass
class Row:
    """One line of the table."""

    bench: str
    contender: str
    result: str
    vs: str = ""
    goal: str = ""
    data: dict[str, object] = field(default_factory=dict)


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _DROP and not key.startswith("COVERAGE_")
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


# -- the peers' virtual environment ------------------------------------------------------------


def _venv_python(folder: Path = PEERS_DIR) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def peer_versions(
    python: str, modules: Sequence[str] = PEER_MODULES, dists: Sequence[str] = PEER_PACKAGES
) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        f"for mod, dist in zip({tuple(modules)!r}, {tuple(dists)!r}):\n"
        "    try: out[mod] = m.version(dist.split('[')[0])\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60, check=False
    )
    return json.loads(done.stdout) if done.returncode == 0 else {}


def ensure_venv(
    folder: Path, modules: Sequence[str], requirements: Sequence[str], dists: Sequence[str] | None = None
) -> tuple[str, dict[str, str]]:
    """Create the virtual environment ``folder`` with ``requirements`` from PyPI if needed.

    ``modules`` and ``dists`` pair each import name with its distribution (for its version);
    ``requirements`` are what pip installs for the missing ones (extras allowed). Returns
    (its python, module -> version).
    """
    dists = tuple(dists or [req.split("[")[0] for req in requirements])
    python = _venv_python(folder)
    if not python.exists():
        log(f"creating a virtual environment in {folder}")
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    versions = peer_versions(str(python), modules, dists)
    missing = [req for mod, req in zip(modules, requirements, strict=True) if mod not in versions]
    if missing:
        log(f"installing {' '.join(missing)} into {folder} with pip")
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-input", *missing],
            check=True,
            timeout=900,
        )
        versions = peer_versions(str(python), modules, dists)
    return str(python), versions


def ensure_peers() -> tuple[str, dict[str, str]]:
    """Create ``benchmarks/.peers`` with the peers from PyPI if needed; (python, versions)."""
    return ensure_venv(PEERS_DIR, PEER_MODULES, PEER_PACKAGES)


# -- children ---------------------------------------------------------------------------------


class Child:
    """A benchmark child process: start it, wait until ready, signal it, time its exit.

    Use as a context manager: a child still alive at the end is killed.
    """

    def __init__(self, python: str, code: str, *, notify: bool = False, args: Sequence[str] = ()) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="graceful-bench-")
        extra: dict[str, str] = {}
        self._sock: socket.socket | None = None
        if notify:
            path = os.path.join(self._dir.name, "notify")
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.bind(path)
            extra["NOTIFY_SOCKET"] = path
        self._stderr = open(os.path.join(self._dir.name, "stderr"), "w+b")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [python, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            env=child_env(extra),
        )
        assert self.proc.stdout is not None
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._out, False)
        self._buffer = b""
        self.lines: list[str] = []
        self.notifications: list[str] = []
        self._pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self._pidfd = os.pidfd_open(self.proc.pid)  # type: ignore[attr-defined,unused-ignore]

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- readiness ------------------------------------------------------------------------------

    def _pump(self, timeout: float) -> bool:
        """Read what is there (stdout lines, notify datagrams); False on stdout EOF."""
        sources: list[object] = [self._out]
        if self._sock is not None:
            sources.append(self._sock)
        readable, _, _ = select.select(sources, [], [], max(0.0, timeout))
        alive = True
        for source in readable:
            if source is self._sock:
                assert self._sock is not None
                self.notifications.extend(self._sock.recv(65536).decode().splitlines())
                continue
            chunk = os.read(self._out, 65536)
            if not chunk:
                alive = False
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in complete)
        return alive

    def wait_for(self, predicate: str, bound: float = READY_BOUND) -> str:
        """Block until a stdout line starts with ``predicate`` (or READY=1 for "READY=1")."""
        deadline = time.monotonic() + bound
        while True:
            for text in self.notifications if predicate == "READY=1" else self.lines:
                if text.startswith(predicate):
                    return text
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise BenchError(f"no {predicate!r} within {bound:g} s; stderr: {self.stderr_tail()}")
            if not self._pump(min(left, 0.5)) and self.proc.poll() is not None:
                raise BenchError(
                    f"exited with {self.proc.returncode} before {predicate!r}; stderr: {self.stderr_tail()}"
                )

    def wait_ready(self, bound: float = READY_BOUND) -> str:
        return self.wait_for("READY=1" if self._sock is not None else "ready", bound)

    def line_value(self, prefix: str) -> str:
        """The rest of the first stdout line that starts with ``prefix``, reading until it comes."""
        return self.wait_for(prefix)[len(prefix) :].strip()

    # -- exit -----------------------------------------------------------------------------------

    def wait_exit(self, bound: float) -> bool:
        """Block until the child exits (True) or ``bound`` seconds pass (False)."""
        return wait_exit(self.proc, bound, self._pidfd)

    def time_signal(self, signum: int = signal.SIGTERM, bound: float = 10.0) -> float | None:
        """Seconds from sending ``signum`` to seeing the exit; None if it did not exit in ``bound``."""
        start = time.perf_counter()
        os.kill(self.proc.pid, signum)
        exited = self.wait_exit(bound)
        took = time.perf_counter() - start
        if not exited:
            self.kill()
            return None
        return took

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def stdout_rest(self, bound: float = 5.0) -> str:
        """Everything the child printed (after it exited)."""
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline and self._pump(0.1):
            pass
        return "\n".join([*self.lines, self._buffer.decode(errors="replace")])

    def stderr_tail(self, limit: int = 600) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-limit:] or "(empty)"

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        if self._sock is not None:
            self._sock.close()
        self._dir.cleanup()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the child binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_exit(proc: subprocess.Popen[bytes], bound: float, pidfd: int | None = None) -> bool:
    """Block until ``proc`` exits (True, reaped) or ``bound`` seconds pass (False).

    Through a pidfd where there is one; ``Popen.wait(timeout)`` polls with sleeps of up to
    50 ms, far too coarse for figures in milliseconds.
    """
    own = None
    if pidfd is None:
        with contextlib.suppress(AttributeError, OSError):
            pidfd = own = os.pidfd_open(proc.pid)  # type: ignore[attr-defined,unused-ignore]
    try:
        if pidfd is not None:
            readable, _, _ = select.select([pidfd], [], [], bound)
            if not readable:
                return False
            proc.wait()
            return True
        deadline = time.perf_counter() + bound
        while proc.poll() is None:
            if time.perf_counter() >= deadline:
                return False
            time.sleep(0.0002)
        return True
    finally:
        if own is not None:
            os.close(own)


def run_json(python: str, code: str, *, args: Sequence[str] = (), bound: float = 300.0) -> dict[str, object]:
    """Run ``code`` to completion; it prints one JSON object on its last stdout line."""
    done = subprocess.run(
        [python, "-c", code, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=bound,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise BenchError(f"exit {done.returncode}; stderr: {done.stderr.strip()[-600:] or '(empty)'}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- numbers ----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def p90(values: Sequence[float]) -> float:
    """Nearest-rank 90th percentile."""
    ordered = sorted(values)
    rank = max(1, -(-9 * len(ordered) // 10))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    value = seconds * 1000
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference > 0 else "-"


def check(ok: bool, text: str) -> str:
    return f"{'met' if ok else 'MISSED'}: {text}"


def exit_text(code: int | None) -> str:
    if code is None:
        return "none (killed)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{128 - code} ({name})"
    return str(code)


def codes_text(codes: Iterable[int | None]) -> str:
    seen: dict[str, int] = {}
    for code in codes:
        text = exit_text(code)
        seen[text] = seen.get(text, 0) + 1
    return ", ".join(text if len(seen) == 1 else f"{text} x{n}" for text, n in seen.items())


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    start = time.perf_counter()
    log(f"{name} ...")
    yield
    log(f"{name} done in {time.perf_counter() - start:.1f} s")


@contextlib.contextmanager
def term_unwinds() -> Iterator[None]:
    """SIGTERM to the benchmark raises KeyboardInterrupt while the block runs: like Ctrl-C, it unwinds
    through a rig's cleanup and leaves no process behind (main thread only; else a no-op)."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
