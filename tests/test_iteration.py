"""graceful.iteration: a walk through items that stops between two items once the worker stops.

In process, on a lifecycle of the test's own (the ``lc`` fixture) or the default one (``fresh``):
the stop comes from the loop body itself (``lc.wrap_up()`` after item N), so the moment is exact.
The hosts' own tests run the same helper in real workers (tests/test_host_dramatiq.py,
tests/test_host_arq.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

import graceful
from graceful import Lifecycle
from graceful.iteration import Iteration, iterate


def test_without_a_stop_every_item_is_done_and_the_cursor_is_past_the_end(lc: Lifecycle) -> None:
    """No stop: all items, in order; finished, not stopped; the cursor is the end."""
    walk = iterate(["a", "b", "c"], lifecycle=lc)
    assert list(walk) == ["a", "b", "c"]
    assert (walk.cursor, walk.done, walk.finished, walk.stopped) == (3, 3, True, False)


def test_a_stop_ends_the_walk_at_the_next_item_boundary(lc: Lifecycle) -> None:
    """The item in hand finishes; no other is taken; the cursor is the next item's index."""
    walk = iterate(range(10), lifecycle=lc)
    seen = []
    for item in walk:
        seen.append(item)
        if item == 3:
            lc.wrap_up("deploy")  # the stop arrives while item 3 is being done
    assert seen == [0, 1, 2, 3]
    assert (walk.cursor, walk.done, walk.stopped, walk.finished) == (4, 4, True, False)


def test_the_next_run_resumes_from_the_cursor_and_every_item_is_done_once(lc: Lifecycle) -> None:
    """A sequence is read from ``cursor``: two runs split by a stop do each item exactly once."""
    items = [f"row{i}" for i in range(7)]
    first = iterate(items, lifecycle=lc)
    done = []
    for item in first:
        done.append(item)
        if item == "row2":
            lc.wrap_up("deploy")
    second = iterate(items, cursor=first.cursor, lifecycle=Lifecycle())
    done.extend(second)
    assert done == items
    assert second.finished
    assert second.cursor == len(items)


def test_a_worker_already_stopping_takes_no_item(lc: Lifecycle) -> None:
    """Stopping before the first item: nothing is taken, the whole job is handed on as it came."""
    lc.wrap_up("deploy")
    taken = []

    def rows() -> Iterator[int]:
        taken.append("read")
        yield 1

    walk = iterate(rows(), cursor=5, lifecycle=lc)
    assert list(walk) == []
    assert (walk.cursor, walk.done, walk.stopped) == (5, 0, True)
    assert taken == []  # not even read: an item is never taken that will not be done


def test_an_item_whose_body_raises_or_breaks_is_not_counted(lc: Lifecycle) -> None:
    """The cursor stays before the item in hand when the body leaves the loop: a retry redoes it."""
    walk = iterate([10, 20, 30], lifecycle=lc)

    def fail_on_20() -> None:
        for item in walk:
            if item == 20:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_on_20()
    assert (walk.cursor, walk.done, walk.stopped, walk.finished) == (1, 1, False, False)

    broken = iterate([10, 20, 30], lifecycle=lc)
    for item in broken:
        if item == 20:
            break
    assert (broken.cursor, broken.done) == (1, 1)


def test_an_iterable_positioned_by_the_caller_counts_from_the_cursor(lc: Lifecycle) -> None:
    """Not a sequence (a generator, a database cursor): read as given; cursor = start + items done."""

    def lines_from(start: int) -> Iterator[str]:
        yield from (f"line {n}" for n in range(start, 100))

    walk = iterate(lines_from(40), cursor=40, lifecycle=lc)
    for line in walk:
        if line == "line 42":
            lc.wrap_up("deploy")
    assert (walk.cursor, walk.done) == (43, 3)


def test_cursor_of_gives_a_keyset_cursor(lc: Lifecycle) -> None:
    """``cursor_of``: the cursor is computed from the last item done (the last id, say)."""
    rows = [{"id": 7}, {"id": 9}, {"id": 15}]
    walk = iterate(rows, cursor=None, cursor_of=lambda row: row["id"], lifecycle=lc)
    for row in walk:
        if row["id"] == 9:
            lc.wrap_up("deploy")
    assert (walk.cursor, walk.stopped) == (9, True)  # resume after id 9


def test_async_for_over_async_and_sync_iterables(lc: Lifecycle) -> None:
    """``async for`` follows the same rules, for an async iterable and for a plain one."""

    async def rows() -> AsyncIterator[int]:
        for n in range(5):
            await asyncio.sleep(0)
            yield n

    async def walk_both() -> tuple[Iteration[int], Iteration[int], list[int]]:
        seen = []
        plain = iterate(range(3), lifecycle=lc)
        async for n in plain:
            seen.append(n)
        walk = iterate(rows(), lifecycle=lc)
        async for n in walk:
            seen.append(n)
            if n == 1:
                lc.wrap_up("deploy")
        return plain, walk, seen

    plain, walk, seen = asyncio.run(walk_both())
    assert seen == [0, 1, 2, 0, 1]
    assert (plain.cursor, plain.finished) == (3, True)
    assert (walk.cursor, walk.stopped) == (2, True)


def test_the_default_lifecycle_is_followed(fresh: Lifecycle) -> None:
    """Without ``lifecycle=``, the process's: what ``graceful.is_stopping()`` says."""
    walk = iterate(range(5))
    for n in walk:
        if n == 0:
            graceful.wrap_up("deploy")
    assert (walk.cursor, walk.stopped) == (1, True)


def test_an_iteration_is_walked_once_and_bad_arguments_say_what_to_do(lc: Lifecycle) -> None:
    """Misuse is an error at the call, before anything is read."""
    walk = iterate([1], lifecycle=lc)
    assert list(walk) == [1]
    with pytest.raises(RuntimeError, match="walked once"):
        list(walk)
    with pytest.raises(TypeError, match="iterable"):
        iterate(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be an int"):
        iterate([1], cursor="a")
    with pytest.raises(TypeError, match="must be an int"):
        iterate([1], cursor=True)
    with pytest.raises(ValueError, match="0 or more"):
        iterate([1], cursor=-1)
    with pytest.raises(ValueError, match="past the end"):
        iterate([1, 2], cursor=3)
    with pytest.raises(TypeError, match="cursor_of"):
        iterate([1], cursor_of=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"graceful\.Lifecycle"):
        iterate([1], lifecycle=object())  # type: ignore[arg-type]

    async def agen() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="async for"):
        list(iterate(agen(), lifecycle=lc))
    assert repr(walk) == "<graceful.iteration.Iteration cursor=1 done=1 finished>"


@pytest.mark.timeout(30)
def test_with_the_generic_worker_a_stopped_walk_is_requeued_from_its_cursor(fresh: Lifecycle) -> None:
    """``graceful.adapters.worker.Worker``: the job raises ``Requeue`` with its cursor; the
    worker puts it back; a second walk from there does the rest: each item once."""
    from graceful.adapters.worker import Requeue, Worker

    queue: list[dict[str, int]] = [{"total": 12, "cursor": 0}]
    done: list[int] = []

    def fetch(timeout: float) -> dict[str, int] | None:
        return queue.pop(0) if queue else None

    def handle(job: dict[str, int]) -> None:
        walk = iterate(range(job["total"]), cursor=job["cursor"])
        for item in walk:
            done.append(item)
            if item == 4:
                fresh.shutdown("deploy", wait=False)  # SIGTERM, as the worker sees it
        if walk.stopped:
            raise Requeue({**job, "cursor": walk.cursor})

    requeued: list[dict[str, int]] = []
    worker = Worker(fetch, handle, requeued.append, poll=0.05)
    assert graceful.run(worker) == 0
    assert requeued == [{"total": 12, "cursor": 5}]
    rest = iterate(range(12), cursor=requeued[0]["cursor"], lifecycle=Lifecycle())
    done.extend(rest)
    assert done == list(range(12))
