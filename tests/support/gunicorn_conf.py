"""A user's own gunicorn config file, as docs/hosts/gunicorn.md shows it: graceful's hooks, and
one of them (post_worker_init) defined again here, calling graceful's from its own."""

import os
import time

import graceful.gunicorn
from graceful.gunicorn import *  # noqa: F403 - the hooks are what a config module exports

graceful_timeout = 10


def post_worker_init(worker: object) -> None:
    graceful.gunicorn.post_worker_init(worker)  # first: graceful watches this worker from now on
    os.write(1, f"EVENT {os.getpid()} ready\n".encode())
    if os.environ.get("TEST_SLOW_BOOT"):  # a test widens the moment before the worker serves
        time.sleep(float(os.environ["TEST_SLOW_BOOT"]))
