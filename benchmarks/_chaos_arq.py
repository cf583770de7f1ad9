"""The chaos run's arq worker: ``arq _chaos_arq.WorkerSettings``.

    python -m arq _chaos_arq.WorkerSettings
    python -c "import _chaos_arq; _chaos_arq.enqueue('jobs.json')"

Plain is arq at its defaults (its SIGTERM handler cancels the jobs in hand at once, arq #192;
they are retried later) but ``max_jobs = 2``, the concurrency every queue has here. The job
sleeps with ``asyncio.sleep`` and records its side effect with the same Redis commands as the
others (``_chaos_job``, called from a thread: they are a few ms of blocking I/O). Under
graceful ``graceful.arq.install(WorkerSettings)`` (docs/hosts/arq.md) wraps the settings and an
iterating job enqueues the rest of itself from its cursor once ``is_stopping()``. The worker
says it is ready in ``on_startup``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import _chaos_job
from arq import create_pool
from arq.connections import RedisSettings


async def job(ctx: dict[str, Any], spec: _chaos_job.Job) -> str:
    await asyncio.to_thread(_chaos_job.started, spec)
    items = int(spec["n"])
    if not items:
        await asyncio.sleep(float(spec["s"]))
        await asyncio.to_thread(_chaos_job.effect, str(spec["id"]))
        await asyncio.to_thread(_chaos_job.finished, spec)
        return "done"
    per_item = float(spec["s"]) / items
    for item in range(int(spec["c"]), items):
        if _chaos_job.GRACEFUL and _stopping():
            await asyncio.to_thread(_chaos_job.finished, spec, f"checkpoint at {item}")
            await ctx["redis"].enqueue_job("job", {**spec, "c": item})
            return f"checkpointed at {item}"
        await asyncio.sleep(per_item)
        await asyncio.to_thread(_chaos_job.effect, f"{spec['id']}:{item}")
    await asyncio.to_thread(_chaos_job.finished, spec)
    return "done"


def _stopping() -> bool:
    import graceful

    return graceful.is_stopping()


async def _startup(ctx: dict[str, Any]) -> None:
    await asyncio.to_thread(_chaos_job.ready)


class WorkerSettings:
    functions = [job]  # noqa: RUF012 - arq reads class attributes
    redis_settings = RedisSettings.from_dsn(_chaos_job.URL)
    on_startup = _startup
    max_jobs = 2


def _install() -> None:
    import graceful.arq  # type: ignore[import-not-found,unused-ignore]

    graceful.arq.install(WorkerSettings)


if _chaos_job.GRACEFUL:
    _install()


def enqueue(path: str) -> None:
    async def send() -> None:
        pool = await create_pool(WorkerSettings.redis_settings)
        for spec in json.loads(Path(path).read_text(encoding="utf-8")):
            await pool.enqueue_job("job", spec)
        await pool.aclose()

    asyncio.run(send())
