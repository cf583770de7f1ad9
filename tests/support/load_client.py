"""A load generator for the drain tests, run as its own process: ``python load_client.py PORT``.

Each of ``THREADS`` threads sends GET requests, one per new connection, until the server
refuses connections; prints one JSON line with what happened to every request:

* ``ok``: a complete 200 response;
* ``refused``: the connection was refused (the server had stopped accepting: not accepted);
* ``reset_before_response``: the connection was reset or closed before any response byte
  (the server side tells whether it had accepted it);
* ``failed``: anything else (an error status, a truncated body, a timeout).

It prints ``started`` once ``WARMUP`` responses are in, so the test knows the stream is flowing.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time

THREADS = 8
WARMUP = 300  # complete responses before "started": SIGTERM lands in a steady stream
TIMEOUT = 15.0


def main(port: int) -> None:
    counts = {"ok": 0, "refused": 0, "reset_before_response": 0, "failed": 0}
    lock = threading.Lock()
    first = threading.Event()
    stop = threading.Event()

    def count(what: str) -> None:
        with lock:
            counts[what] += 1

    def one() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/work", headers={"Connection": "close"})
            try:
                response = conn.getresponse()
            except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
                return "reset_before_response"
            body = response.read()
            return "ok" if response.status == 200 and body == b"done" else "failed"
        except ConnectionRefusedError:
            return "refused"
        except (ConnectionResetError, BrokenPipeError):
            return "reset_before_response"  # while sending: the server never read it
        except (OSError, http.client.HTTPException):
            return "failed"
        finally:
            conn.close()

    def worker() -> None:
        while not stop.is_set():
            outcome = one()
            count(outcome)
            if outcome == "ok" and counts["ok"] >= WARMUP:
                first.set()
            elif outcome == "refused":
                stop.set()

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    if first.wait(TIMEOUT):
        print("started", flush=True)
    for thread in threads:
        thread.join()
    counts["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
