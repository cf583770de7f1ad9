"""Job iteration: work through items from a cursor, stop at an item boundary when the worker stops.

Why: a job that works through many items (rows, files, ids) should not be cut in the middle by
a deploy, nor hold the worker until the deadline. SolidQueue gives its jobs a ``stopping?``
hook and Shopify's job-iteration builds on it: the job walks its items from a cursor, and when
the worker is stopping it stops *between two items* and is enqueued again from where it got
to, so the next worker finishes it and every item is done once. Every host's docs here showed
that loop by hand (``if graceful.is_stopping(): enqueue the rest; return``); this is the loop,
once, for every host: rq, Celery, Dramatiq, arq and ``graceful.adapters.worker.Worker``.

::

    walk = graceful.iteration.iterate(job.ids, cursor=job.cursor)
    for item in walk:
        process(item)
    if walk.stopped:
        enqueue_again(job, cursor=walk.cursor)  # the queue's own call: send(), apply_async()...

The rules, chosen so that an item is never skipped:

* ``is_stopping()`` is looked at *before* each item is taken, the first one included: once it
  is True no item is taken (the one in hand finishes), ``stopped`` is True and ``cursor`` says
  where the next run starts. A job started on a worker already stopping hands everything on.
* An item counts as done when the loop asks for the next one (or the items run out). If the
  loop body raises or breaks, the item in hand is *not* counted: a run from ``cursor`` does it
  again (at-least-once for that item, never lost).
* The cursor: for a sequence (a list, a tuple, a ``range``), the index of the next item, and the
  items are read from ``cursor`` on; for any other iterable (a generator, a database cursor, an
  async iterator), already positioned by you, ``cursor`` plus the number of items done; with
  ``cursor_of=fn``, ``fn(last item done)`` (keyset pagination: the last id).
* ``async for`` works the same (on a sync or an async iterable), for arq and async actors.

Not on ``import graceful``'s path: ``import graceful.iteration`` loads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from ._current import get_lifecycle
from ._lifecycle import Lifecycle

__all__ = ["Iteration", "iterate"]

T = TypeVar("T")


def iterate(
    items: Iterable[T] | AsyncIterable[T],
    *,
    cursor: Any = 0,
    cursor_of: Callable[[T], Any] | None = None,
    lifecycle: Lifecycle | None = None,
) -> Iteration[T]:
    """Walk ``items`` from ``cursor``, stopping at an item boundary once the worker is stopping.

    See the module docstring for the rules. Iterate the result once, with ``for`` or
    ``async for``; then read ``stopped`` (enqueue the rest from ``cursor``) and ``cursor``.

    Args:
        items: a sequence (read from index ``cursor``), or any iterable or async iterable that
            already starts at ``cursor``.
        cursor: where this run starts: what the previous run's ``cursor`` was (default 0). An
            int unless ``cursor_of`` is given.
        cursor_of: ``fn(item)``, the cursor after ``item`` is done (e.g. ``lambda row: row.id``).
        lifecycle: whose ``is_stopping()`` to follow (default: the process's, as
            ``graceful.is_stopping()``).

    Raises:
        TypeError: ``items`` is not iterable, ``cursor`` is not an int (without ``cursor_of``),
            ``cursor_of`` is not callable, or ``lifecycle`` is not a ``graceful.Lifecycle``.
        ValueError: ``cursor`` is negative, or past the end of a sequence.
    """
    return Iteration(items, cursor=cursor, cursor_of=cursor_of, lifecycle=lifecycle)


class Iteration(Generic[T]):
    """One walk through items from a cursor (what :func:`iterate` returns); iterate it once.

    Attributes:
        cursor: where the next run starts: the index of the next item (a sequence), the start
            plus the items done (another iterable), or ``cursor_of(last item done)``.
        done: how many items this run finished.
        stopped: True if it stopped because the worker is stopping (enqueue the rest from
            ``cursor``); False if the items ran out, or the loop was left by a ``break`` or an
            exception.
        finished: True if every item was done.
    """

    def __init__(
        self,
        items: Iterable[T] | AsyncIterable[T],
        *,
        cursor: Any = 0,
        cursor_of: Callable[[T], Any] | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        if not isinstance(items, (Iterable, AsyncIterable)):
            raise TypeError(f"iterate() takes an iterable or an async iterable, not {type(items).__name__}")
        if cursor_of is not None and not callable(cursor_of):
            raise TypeError(
                f"iterate(cursor_of=...) must be callable, e.g. lambda row: row.id; not {cursor_of!r}"
            )
        if lifecycle is not None and not isinstance(lifecycle, Lifecycle):
            raise TypeError(f"iterate(lifecycle=...) takes a graceful.Lifecycle or None, not {lifecycle!r}")
        if cursor_of is None:
            if isinstance(cursor, bool) or not isinstance(cursor, int):
                raise TypeError(
                    f"iterate(cursor=...) must be an int (a position) unless cursor_of= says how to "
                    f"compute it from an item; got {cursor!r}"
                )
            if cursor < 0:
                raise ValueError(f"iterate(cursor=...) must be 0 or more; got {cursor}")
            if isinstance(items, Sequence) and cursor > len(items):
                raise ValueError(f"iterate(cursor={cursor}) is past the end of the {len(items)} items")
        self._items = items
        self._cursor_of = cursor_of
        self._lifecycle = lifecycle
        self._used = False
        self.cursor: Any = cursor
        self.done = 0
        self.stopped = False
        self.finished = False

    def _start(self) -> Lifecycle:
        if self._used:
            raise RuntimeError("an Iteration is walked once; call iterate() again for another walk")
        self._used = True
        return self._lifecycle if self._lifecycle is not None else get_lifecycle()

    def _source(self) -> Iterator[T]:
        items = self._items
        if self._cursor_of is None and isinstance(items, Sequence):
            return (items[index] for index in range(self.cursor, len(items)))
        if not isinstance(items, Iterable):
            raise TypeError("an async iterable is walked with `async for`, not `for`")
        return iter(items)

    def _advance(self, item: T) -> None:
        self.done += 1
        self.cursor = self.cursor + 1 if self._cursor_of is None else self._cursor_of(item)

    def __iter__(self) -> Iterator[T]:
        lifecycle = self._start()
        source = self._source()
        while True:
            if lifecycle.is_stopping():
                self.stopped = True
                return
            try:
                item = next(source)
            except StopIteration:
                self.finished = True
                return
            yield item
            self._advance(item)

    def __aiter__(self) -> AsyncIterator[T]:
        return self._walk_async(self._start())

    async def _walk_async(self, lifecycle: Lifecycle) -> AsyncIterator[T]:
        items = self._items
        if isinstance(items, AsyncIterable):
            source = items.__aiter__()

            async def take() -> T:
                return await source.__anext__()
        else:
            plain = self._source()

            async def take() -> T:
                try:
                    return next(plain)
                except StopIteration:
                    raise StopAsyncIteration from None

        while True:
            if lifecycle.is_stopping():
                self.stopped = True
                return
            try:
                item = await take()
            except StopAsyncIteration:
                self.finished = True
                return
            yield item
            self._advance(item)

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else "finished" if self.finished else "walking"
        return f"<graceful.iteration.Iteration cursor={self.cursor!r} done={self.done} {state}>"
