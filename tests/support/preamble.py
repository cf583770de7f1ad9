"""What the server programs the tests start share: ``PREAMBLE``, put before their own code.

It gives a program graceful's log lines on stderr (INFO), an event ``release`` that the test
sets by writing a line to the child's stdin (so the child is started with
``graceful_process(..., stdin=True)`` and released with ``proc.send_line("go")``), and
``say(line)``, which prints one whole line even when handlers print from many threads (so
``proc.wait_for_line`` reads whole lines).
"""

from __future__ import annotations

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
