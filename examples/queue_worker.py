"""A queue worker on a Redis list under graceful.run: no job is lost at shutdown.

Start a Redis (``redis-server``), run this, push jobs from another terminal:

    redis-cli LPUSH jobs send-welcome-mail:1 send-welcome-mail:2

and press Ctrl-C (or ``kill -TSTP`` first to stop fetching and stay up). Jobs in hand finish;
a job still running at the force-quit deadline is pushed back on the list; the worker's key in
Redis (``graceful:workers:mailer:<host>:<pid>``) disappears at exit. ``REDIS_URL`` picks the
Redis (default ``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import redis

import graceful
from graceful.adapters.heartbeat import Registration
from graceful.adapters.worker import Worker

log = logging.getLogger("mailer")
client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), decode_responses=True)


def fetch(timeout: float) -> str | None:
    item = client.brpop(["jobs"], timeout=timeout)
    return item[1] if item else None


def handle(job: str) -> None:
    log.info("working on %s", job)
    time.sleep(0.5)  # stands for sending the mail
    log.info("done: %s", job)


def requeue(job: str) -> None:
    client.rpush("jobs", job)  # the end BRPOP takes first: it runs next


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    worker = Worker(fetch, handle, requeue, concurrency=4, name="mailer")
    return graceful.run([worker, Registration(client, "mailer")])


if __name__ == "__main__":
    sys.exit(main())
