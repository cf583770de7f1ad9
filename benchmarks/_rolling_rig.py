"""The rolling-restart rig's moving parts: process groups, HAProxy and its stats socket, ``hey``.

Why it is built this way:

* Every process the rig starts (each instance, HAProxy, ``hey``) gets its own session, hence its
  own process group, and is registered in a ``Groups`` the moment it exists; leaving the
  ``with`` block (normally, by an exception, or by Ctrl-C's KeyboardInterrupt) kills every group
  that is still there, so nothing outlives the run. A gunicorn arbiter's workers are in its
  group. Ctrl-C in a terminal reaches only the rig (the children are in other sessions).
* HAProxy's view is read where HAProxy keeps it: ``show stat`` on its runtime socket (a Unix
  socket in the abstract namespace), a fresh connection per poll, every ~20 ms. The
  status column says when a server was marked down and when it is UP again; the counters
  (5xx sent, retries, redispatches, connection and response errors) are snapshot per restart.
* ``hey`` writes one line per completed request (duration, status code, offset from hey's
  start) but leaves out requests that got no response: ``-o csv`` has no line for them, and its
  error summary is printed only without ``-o``. ``-o`` also takes a Go template over hey's report
  (undocumented: its usage names only csv), so the rig asks for both in one run (``HEY_TEMPLATE``:
  the CSV lines, then hey's error distribution and its count of requests). Here, behind
  HAProxy, the failures are read from HAProxy's own log as well (``option httplog`` + ``dontlog-normal``: one line per request that went wrong,
  with its status, -1 when none was sent, and its termination state), written to HAProxy's
  stdout. HAProxy's ``req_tot`` counter cannot stand in for it: it also counts requests that
  HAProxy replays on another connection, which the client never sees fail.
* Every wait has a bound; nothing sleeps to synchronise: readiness is HAProxy saying UP, exit
  is a pidfd turning readable (``_harness.wait_exit``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from _harness import BenchError, child_env, free_port, wait_exit

POLL = 0.02  # seconds between two reads of HAProxy's state
PASSED = {"L4OK", "L6OK", "L7OK"}  # HAProxy's check_status once a check has passed
CHECK_INTER = 0.2  # seconds between two health checks of one instance (HAProxy's ``inter``)
START_BOUND = 30.0  # seconds for HAProxy to see a new instance UP
EXIT_BOUND = 40.0  # seconds for an instance to exit after SIGTERM (gunicorn's graceful_timeout is 30)
COUNTERS = ("hrsp_5xx", "econ", "eresp", "wretr", "wredis", "cli_abrt", "srv_abrt")


def tool(name: str) -> str:
    """The absolute path of ``name`` (haproxy lives in /usr/sbin, often not on a user's PATH); "" if none."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path) or ""


class Groups:
    """The process groups this run started; every one still alive is killed on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], *, env: dict[str, str], stdout: object, stderr: object,
              cwd: str | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        # A Ctrl-C or SIGTERM raised between the fork and the append would leave a child no one
        # kills: both wait (blocked) until the child is listed; the child unblocks them itself.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,  # type: ignore[arg-type]
                stderr=stderr,  # type: ignore[arg-type]
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, mask),  # noqa: PLW1509
            )
            self.procs.append(proc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the group of ``proc``, unless ``proc`` was reaped already.

        Not reaped, its pid (and so its group's id) is still ours, even as a zombie; reaped,
        the pid may belong to someone else's process by now, so it is left alone.
        """
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group: a gunicorn arbiter's workers too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def __enter__(self) -> Groups:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            self.kill(proc)
        self.procs.clear()


class HAProxy:
    """One HAProxy in front of two servers, with its runtime socket."""

    def __init__(self, groups: Groups, workdir: Path, servers: list[tuple[int, int | None]], *,
                 retries: int, probes: bool) -> None:  # fmt: skip
        self.port = free_port()
        # an abstract Unix socket: no path-length limit (108 bytes) on a deep TMPDIR, nothing to remove
        self.socket = f"graceful-rig-{os.getpid()}-{self.port}"
        check = "option httpchk GET /readyz" if probes else "option httpchk GET /"
        lines = [
            "global",
            f"    stats socket abns@{self.socket} level admin",
            "    nbthread 1",
            "    log stdout format raw local0",
            "    maxconn 2000",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    option dontlog-normal",  # one line per request that went wrong, none for the others
            "    timeout connect 1s",
            "    timeout client 30s",
            "    timeout server 30s",
            "    timeout http-keep-alive 5s",
            f"    retries {retries}",
            *(["    option redispatch"] if retries else []),
            "frontend fe",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend be",
            "backend be",
            "    balance roundrobin",
            f"    {check}",
        ]
        for index, (port, probe) in enumerate(servers, 1):
            where = f" port {probe}" if probes and probe is not None else ""
            lines.append(
                f"    server s{index} 127.0.0.1:{port} check{where} inter {round(CHECK_INTER * 1000)} fall 1 rise 1"
            )
        self.config = workdir / "haproxy.cfg"
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        checked = subprocess.run(
            [tool("haproxy"), "-c", "-f", str(self.config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if checked.returncode != 0:
            said = (checked.stderr + checked.stdout).strip()[-600:]
            raise BenchError(f"haproxy rejected its configuration {self.config}: {said}")
        self._log = open(workdir / "haproxy.log", "w+b")  # noqa: SIM115 - closed in close()
        self.requests_log = workdir / "haproxy.requests"
        self._requests = open(self.requests_log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = groups.start(
            [tool("haproxy"), "-db", "-f", str(self.config)],
            env=child_env(),
            stdout=self._requests,
            stderr=self._log,
            cwd=str(workdir),
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                self.stat()
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                raise BenchError(f"haproxy did not start: {self._log.read().decode(errors='replace')[-600:]}")
            time.sleep(POLL)  # polling a socket that is not there yet: nothing to wait on

    def command(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(("\0" + self.socket).ljust(108, "\0"))  # HAProxy pads abns@ names to sun_path
            sock.sendall(text.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def stat(self) -> dict[str, dict[str, str]]:
        """``show stat``: svname (FRONTEND, BACKEND, s1, s2) -> column -> value."""
        text = self.command("show stat").lstrip("# ")
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows:
            raise OSError("empty show stat")
        return {row["svname"]: row for row in rows if row.get("svname")}

    def status(self, server: str) -> str:
        return self.stat()[server]["status"]

    def counters(self) -> dict[str, int]:
        """The counters the report adds up: the frontend's requests and 5xx, the backend's errors."""
        stat = self.stat()
        out = {"req_tot": int(stat["FRONTEND"]["req_tot"] or 0)}
        for name in COUNTERS:
            out[name] = int(stat["BACKEND"].get(name) or 0)
        out["fe_5xx"] = int(stat["FRONTEND"]["hrsp_5xx"] or 0)
        return out

    def wait_up(self, server: str, bound: float = START_BOUND) -> float:
        """Poll until ``server`` is UP *and has passed a check*; the monotonic time it was seen so.

        HAProxy starts a server UP before its first check has run (``check_status`` INI), so
        "UP" alone let the load begin while an instance was still starting: HAProxy sent it
        requests it refused (``503 SC``), counted before the first restart.
        """
        deadline = time.monotonic() + bound
        while True:
            row = self.stat()[server]
            if row["status"].startswith("UP") and row.get("check_status", "") in PASSED:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise BenchError(f"HAProxy never saw {server} UP within {bound:g} s")
            time.sleep(POLL)

    def close(self) -> None:
        Groups.kill(self.proc)
        self._log.close()
        self._requests.close()

    def went_wrong(self) -> list[Logged]:
        """The requests HAProxy logged as abnormal (``option dontlog-normal``), oldest first."""
        out = []
        wall_to_mono = time.time() - time.monotonic()
        for line in self.requests_log.read_text(errors="replace").splitlines():
            match = _HTTPLOG.search(line)
            if not match:
                continue
            accepted = datetime.strptime(match["date"], "%d/%b/%Y:%H:%M:%S.%f").timestamp() - wall_to_mono
            total = int(match["ta"])
            out.append(Logged(accepted + max(total, 0) / 1000, int(match["status"]), match["state"], line))
        return out


# HAProxy's httplog: client [accept date] frontend backend/server TR/Tw/Tc/Tr/Ta status bytes
# cookie cookie termination-state ...
_HTTPLOG = re.compile(
    r"\[(?P<date>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3})\] \S+ \S+ "
    r"-?\d+/-?\d+/-?\d+/-?\d+/(?P<ta>-?\d+) (?P<status>-?\d+) \d+ \S+ \S+ (?P<state>\S{4}) "
)


@dataclass(frozen=True)
class Logged:
    """One request HAProxy logged as abnormal."""

    end: float  # monotonic time it ended (accept date + total time)
    status: int  # -1: no answer at all
    state: str  # termination state, e.g. "SD--" (the server closed mid-answer), "----"
    line: str

    @property
    def unanswered(self) -> bool:
        """The client got no complete answer (no status, or one cut short), and not by its own doing.

        A 5xx is in hey's CSV already. A first letter C or c of the termination state is the
        client closing or timing out (hey closing an idle connection as it stops: "400 CR--").
        """
        return self.status < 500 and self.state[0] not in "-Cc"


# hey's -o: "csv", or else a Go text/template over its report (hey 0.1.4, requester/print.go).
# .Lats, .StatusCodes and .Offsets are the answered requests, in the order they completed;
# .ErrorDist maps each error's text to how many requests ended with it; .NumRes counts both.
HEY_TEMPLATE = (
    "{{ $codes := .StatusCodes }}{{ $offsets := .Offsets }}response-time,status-code,offset"
    '{{ range $i, $v := .Lats }}\n{{ printf "%.6f" $v }},{{ index $codes $i }},'
    '{{ printf "%.6f" (index $offsets $i) }}{{ end }}\n'
    "{{ range $e, $n := .ErrorDist }}error\t{{ $n }}\t{{ $e }}\n{{ end }}"
    "results\t{{ .NumRes }}\n"
)


@dataclass
class Hey:
    """``hey`` sending until stopped (or until ``requests`` were made)."""

    groups: Groups
    workdir: Path
    url: str
    keepalive: bool
    concurrency: int = 10
    qps: int = 50  # per worker: 10 x 50 = 500 req/s at most, ~20 ms each; 0: no limit
    method: str = "GET"
    requests: int = 0  # -n: this many in all, then hey exits by itself; 0: until stop()
    name: str = "hey"  # its files in workdir: NAME.csv, NAME.err
    started: float = 0.0  # monotonic time the rig launched hey
    skew: float = 0.0  # hey's own start, after ``started``: fitted by the run (see _rolling_run)
    rows: list[tuple[float, float, int]] = field(default_factory=list)  # (end offset, duration, status)
    errors: dict[str, int] = field(default_factory=dict)  # error text -> requests that ended with it
    results: int = 0  # every request hey made: answered (``rows``) and failed (``errors``)

    def start(self) -> None:
        argv = [tool("hey"), *(["-n", str(self.requests)] if self.requests else ["-z", "900s"])]
        argv += ["-c", str(self.concurrency), "-m", self.method, "-o", HEY_TEMPLATE]
        if self.qps:
            argv += ["-q", str(self.qps)]
        if not self.keepalive:
            argv.append("-disable-keepalive")
        self._out = open(self.workdir / f"{self.name}.csv", "w+b")  # noqa: SIM115 - closed in stop()
        self._err = open(self.workdir / f"{self.name}.err", "w+b")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = self.groups.start(
            [*argv, self.url], env=child_env(), stdout=self._out, stderr=self._err, cwd=str(self.workdir)
        )

    def stop(self) -> None:
        """SIGINT: hey lets its requests in flight finish, writes its report and exits.

        With ``requests`` it is left to finish them: a SIGINT in its first milliseconds, before
        the Go runtime has its handler, would kill it with no report.
        """
        if self.proc.poll() is None and not self.requests:
            os.kill(self.proc.pid, signal.SIGINT)
        if not wait_exit(self.proc, 30):
            Groups.kill(self.proc)
            raise BenchError("hey did not exit within 30 s of SIGINT")
        self._out.seek(0)
        text = self._out.read().decode(errors="replace")
        self._out.close()
        self._err.seek(0)
        err = self._err.read().decode(errors="replace").strip()
        self._err.close()
        lines = text.strip("\n").splitlines()  # hey prints the report and a newline
        header = lines[0].split(",") if lines else []
        if "status-code" not in header or not lines[-1].startswith("results\t"):
            raise BenchError(
                f"hey wrote no report (exit {self.proc.returncode}): {err[-600:] or text[-600:]}"
            )
        took, code, offset = (
            header.index("response-time"),
            header.index("status-code"),
            header.index("offset"),
        )
        for line in lines[1:]:
            if line.startswith("error\t"):
                _, count, message = line.split("\t", 2)
                self.errors[message] = self.errors.get(message, 0) + int(count)
            elif line.startswith("results\t"):
                self.results = int(line.split("\t")[1])
            elif line:
                row = line.split(",")
                self.rows.append((float(row[offset]) + float(row[took]), float(row[took]), int(row[code])))
