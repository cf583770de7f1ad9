"""A keep-alive load client for the upgrade tests, run as its own process.

``python keepalive_client.py PORT [THREADS]``: each thread keeps one HTTP/1.1 connection to
127.0.0.1:PORT and sends ``POST /`` on it back to back. A POST, because a client may not send it
again by itself: a connection closed under a request is counted as the failure it is, where a
GET might be replayed without a word (Go's net/http, urllib3 do). A response that says
``Connection: close`` ends its connection, and the next request opens a new one, as every
client does. Each response's body is the pid of the process that answered it.

On stdout: ``started`` once ``WARMUP`` responses are in; ``pid N`` the first time pid N
answers; and, once a line ``stop`` arrives on stdin, one JSON line:
``{"ok": n, "failed": n, "errors": {"<exception>: <text>": n}, "pids": {"<pid>": n}}``.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading

WARMUP = 50
TIMEOUT = 15.0


def main(port: int, threads: int) -> None:
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0}
    errors: dict[str, int] = {}
    pids: dict[str, int] = {}
    stop = threading.Event()

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def record(body: bytes | None, error: str | None) -> None:
        with lock:
            if error is not None:
                counts["failed"] += 1
                errors[error] = errors.get(error, 0) + 1
                return
            counts["ok"] += 1
            pid = (body or b"?").decode("ascii", "replace")
            pids[pid] = pids.get(pid, 0) + 1
            if pids[pid] == 1:
                say(f"pid {pid}")
            if counts["ok"] == WARMUP:
                say("started")

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        while not stop.is_set():
            try:
                conn.request("POST", "/", body=b"x", headers={"Content-Type": "text/plain"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    record(None, f"status {response.status}")
                else:
                    record(body, None)
            except (OSError, http.client.HTTPException) as exc:
                record(None, f"{type(exc).__name__}: {exc}")
                conn.close()  # the next request opens a new connection
        conn.close()

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    stop.set()
    for thread in workers:
        thread.join(TIMEOUT + 5)
    with lock:
        say(json.dumps({**counts, "errors": errors, "pids": pids}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 8)
