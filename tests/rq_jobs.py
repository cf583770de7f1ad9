"""Job functions for the rq tests (an rq worker imports them by name)."""

from __future__ import annotations

import os

import redis


def slow(name: str) -> str:
    """Say it started (a Redis list the test waits on), then wait for the test's go-ahead."""
    client = redis.Redis.from_url(os.environ["RQ_TEST_REDIS"], socket_timeout=90)
    client.rpush("started", name)
    client.blpop(["release"], timeout=60)
    return f"done {name}"
