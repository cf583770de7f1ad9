"""What a Celery worker holds at graceful's deadline, and what becomes of each message.

Why it is built this way (issue #29, a chaos run: a prefork worker stopped at random moments
with a 0.2 s budget, two seeds):

* **What the parent believes is stale.** During a warm shutdown Celery's main thread waits in
  the pool's join and reads no results: a task that finished in a pool process a second ago is
  still "active" there, its ``acks_late`` message unacknowledged. Putting back every
  unacknowledged message duplicated 38 tasks that had finished. The truth comes from the pool
  processes themselves (graceful/_celery_pool.py): each says what it runs and what it finished,
  then stops. A task that finished is acknowledged now (what Celery would have done had it read
  the result), never put back.
* **Stop, then put back.** The pool processes are SIGKILLed, and gone, before any message goes
  back: a task put back while it still ran could finish before the exit (4 duplicates). The
  only duplicate left is a task whose side effect was applied before it was killed. (The
  threads and solo pools run tasks in threads of the main process, which nothing can stop but
  the exit that follows: a task there may still apply its side effect in those milliseconds.)
* **Claimed first.** Every request held is marked acknowledged before the pool processes are
  stopped, so that Celery's own threads (its pool's supervisor sees the processes die and would
  acknowledge or reject their messages) leave them to this module; their kombu messages are
  acted on directly.
* **What the worker's own connection took.** kombu's Redis transport fetches with ``BRPOP``.
  When the worker stops, one may be in flight: sent, its reply (a message already taken off
  the queue) not read yet, or still blocked on an empty queue, where the first message put
  back is handed straight to it. Either way that message dies with the process: a worker
  forced within about a second of its stop (kombu's ``brpop_timeout``) lost the very task it
  had "put back" (seen with a 0.5 s budget, every time). So once everything is settled the
  reply is read (bounded), and a message in it is pushed back where it came from, named.
  Celery's own clean stop does the same when it closes the channel; a forced exit never gets
  there.
* **Early acknowledgements.** A task acknowledged when it started (Celery's default, not
  ``acks_late``) cannot be put back: by default it is lost, as at-most-once delivery means, and
  the report names it with its arguments so that it can be sent again by hand (42 such tasks
  were lost, unnamed but for their ids). With ``install(app, resend_early_acked=True)``,
  ``GRACEFUL_CELERY_RESEND_EARLY_ACKED=1`` or a task's ``graceful_resend_early_acked = True``,
  graceful sends it again at the deadline: the same message (name, id, arguments, headers) on
  the same exchange and routing key, from a connection of its own. That is at-least-once: a
  task killed after its side effect runs twice.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from collections.abc import Callable, Iterable

from celery.worker import state as worker_state

from ._checks import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "Fate",
    "Held",
    "claim",
    "held_requests",
    "keep_received",
    "restore_the_rest",
    "send_again",
    "settle",
    "take_back_in_flight",
]

log = logging.getLogger("graceful")

ARGS_SHOWN = 1000
"""Characters of a lost task's arguments the report shows (each of args and kwargs)."""
IN_FLIGHT_GRACE = 0.2
"""Seconds to wait for the reply of a ``BRPOP`` in flight (it comes at once when it took a
message, even one this module has just put back)."""

_received: dict[str, Any] = {}
"""Task id -> Request, from ``task_received`` until acknowledged and done: Celery forgets the
prefetched ones when its consumer closes, and their messages stay unacknowledged."""


def keep_received(request: Any) -> None:
    """At ``task_received`` (the main process, on Celery's event loop): keep it until it is done
    with (bounded by the prefetch: the finished ones are dropped here, at the next one)."""
    channel = request.message.channel
    for task_id, held in list(_received.items()):
        done = held.acknowledged and held not in worker_state.active_requests
        # Another channel: a reconnect redelivers it.
        if done or held.message.channel is not channel:
            del _received[task_id]
    _received[str(request.id)] = request


def held_requests() -> list[Any]:
    """Every request this worker holds (running or prefetched), each once, in a stable order."""
    # The main thread may change the sets while we copy them.
    for _ in range(10):
        try:
            held = [*worker_state.active_requests, *worker_state.reserved_requests, *list(_received.values())]
            break
        except RuntimeError:
            continue
    else:
        held = []
    found = {id(r): r for r in held if not (r.acknowledged and r not in worker_state.active_requests)}
    return sorted(found.values(), key=lambda r: (r.worker_pid is None, str(r.id)))


class Fate(enum.Enum):
    """What became of a held task's message at the deadline."""

    PUT_BACK = "put back on its queue"
    ACKNOWLEDGED = "finished before the deadline: acknowledged now"
    DONE = "finished before the deadline"
    SENT_AGAIN = "sent again"
    LOST = "LOST"
    FAILED = "could not be put back"


class Held:
    """One request held at the deadline: claimed (see the module docstring), then settled."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.acknowledged = bool(request.acknowledged)
        """Acknowledged before the deadline: when it started (early), or by Celery once done."""
        self.late = bool(getattr(request.task, "acks_late", False))
        self.pid: int | None = request.worker_pid
        self.fate: Fate | None = None
        self.state = ""
        """Where it was: "killed mid-run in process P", "finished in process P", "not started"."""


def claim(requests: Iterable[Any]) -> list[Held]:
    """Take every request over from Celery: marked acknowledged, its message is ours to settle.

    One Celery had acknowledged already (an early acknowledgement as it started, or an
    ``acks_late`` one once done) may still be unacknowledged at the broker: Celery hands the
    ``ack`` to its event loop (``call_soon``), which stopped with the consumer, and only its
    clean shutdown would run what is left. It is sent now; else the broker would deliver a task
    again that Celery (and this report) had counted as taken.
    """
    held = []
    for request in requests:
        item = Held(request)
        held.append(item)
        request.acknowledged = True
        if item.acknowledged:
            _acknowledge(request)
    return held


def settle(
    held: list[Held],
    *,
    running: dict[str, int],
    finished: set[str],
    silent: set[int],
    resend: Callable[[Any], bool],
    send_again: Callable[[list[Any]], list[str]],
) -> list[str]:
    """Decide and act on each held request, once the pool processes are gone; the report lines.

    ``running``: task id -> pid, what the processes (or this one) said they ran; ``finished``:
    the ids they said they had finished; ``silent``: processes that did not answer (what Celery
    gave them counts as running). ``resend(request)``: send an early-acknowledged task again?
    ``send_again(messages)``: publishes them, returns an error per message that failed ("" if
    it went).
    """
    again: list[Held] = []
    for item in held:
        known = _place(item, running, finished, silent)
        if known is not None:
            item.fate = known
        elif not item.acknowledged:
            item.fate = _put_back(item.request)
        elif resend(item.request):
            again.append(item)
        else:
            item.fate = Fate.LOST
    if again:
        errors = send_again([item.request.message for item in again])
        for item, error in zip(again, errors, strict=True):
            item.fate = Fate.LOST if error else Fate.SENT_AGAIN
            if error:
                item.state += f"; sending it again failed ({error})"
    return [line for item in held for line in _lines(item)]


def _place(item: Held, running: dict[str, int], finished: set[str], silent: set[int]) -> Fate | None:
    """Where the task was (``item.state``); its fate if it finished (acknowledged now if Celery
    had not), None if it was cut or never started (put back, sent again or lost)."""
    task_id = str(item.request.id)
    where = f"process {item.pid}" if item.pid is not None else ""
    if task_id in finished:
        item.state = f"finished in {where or 'a pool process'}"
        return Fate.DONE if item.acknowledged else _acknowledge(item.request)
    if task_id in running:
        pid = running[task_id]
        item.state = (
            f"killed mid-run in process {pid}"
            if pid != os.getpid()
            else "cut mid-run in the main process (a thread: only the exit stops it)"
        )
    elif item.pid in silent:
        item.state = f"in process {item.pid}, which gave no answer (stopped, or gone): cut"
    elif item.acknowledged and not item.late:
        # Acknowledged when a pool process accepted it, never said to have run or finished: it
        # was in the instant before its start (or its process is gone), and it is cut.
        item.state = f"accepted by {where or 'a pool process'}, killed"
    elif item.acknowledged:
        item.state = "finished (acknowledged by Celery)"
        return Fate.DONE
    else:
        item.state = f"handed to {where}, not started" if where else "not started (prefetched)"
    return None


def _acknowledge(request: Any) -> Fate:
    message = request.message
    try:
        if not message.acknowledged:
            message.ack()
    except Exception:
        # The others must still be settled.
        log.exception("celery task %s[%s] could not be acknowledged", request.name, request.id)
    return Fate.ACKNOWLEDGED


def _put_back(request: Any) -> Fate:
    """Straight to the channel: Celery's ``request.reject()`` queues the call on its event loop,
    which its main thread is not running now (it waits for the pool)."""
    message = request.message
    try:
        if not message.acknowledged:
            message.reject(requeue=True)
    except Exception:
        log.exception("celery task %s[%s] could not be put back on its queue", request.name, request.id)
        return Fate.FAILED
    log.warning("celery task %s[%s] put back on its queue at the deadline", request.name, request.id)
    return Fate.PUT_BACK


def _lines(item: Held) -> list[str]:
    request = item.request
    fate = item.fate or Fate.FAILED
    head = f"  - task {request.name} id {request.id}, {item.state}: "
    if fate is Fate.SENT_AGAIN:
        log.warning(
            "celery task %s[%s] was acknowledged when it started and was cut at the deadline: sent again",
            request.name,
            request.id,
        )
        return [head + "acknowledged when it started (not acks_late): sent again (same id, arguments)"]
    if fate is Fate.LOST:
        text = (
            f"acknowledged when it started (not acks_late): LOST; to send it again by hand: "
            f"{request.name} args={_shown(request, 'args')} kwargs={_shown(request, 'kwargs')}"
        )
        log.warning(
            "celery task %s[%s] was acknowledged when it started and was cut at the deadline: it is lost "
            "(args=%s kwargs=%s)",
            request.name,
            request.id,
            _shown(request, "args"),
            _shown(request, "kwargs"),
        )
        return [head + text]
    return [head + fate.value]


def _shown(request: Any, what: str) -> str:
    try:
        text = repr(getattr(request, what))
    except Exception as exc:  # noqa: BLE001 - a body that cannot be decoded: say so, go on
        return f"<unreadable: {exc!r}>"
    return text if len(text) <= ARGS_SHOWN else f"{text[:ARGS_SHOWN]}... ({len(text)} characters)"


def restore_the_rest(held: list[Held]) -> None:
    """Put back what else the channels hold unacknowledged (kombu's virtual transports: Redis,
    SQS...). AMQP brokers redeliver by themselves once the connection drops with the process."""
    channels = {
        id(c): c for item in held if (c := getattr(item.request.message, "channel", None)) is not None
    }
    for channel in channels.values():
        restore = getattr(getattr(channel, "qos", None), "restore_unacked", None)
        if callable(restore):
            try:
                restore()
            except Exception:
                log.exception("graceful: could not put back the other unacknowledged celery messages")


def take_back_in_flight(channels: Iterable[Any]) -> list[str]:
    """kombu's Redis transport: read the reply of a ``BRPOP`` in flight on each channel and push
    a message it took back where it came from (see the module docstring). The report lines."""
    lines = []
    for channel in {id(c): c for c in channels if c is not None}.values():
        connection = getattr(channel, "_in_poll", None)
        if not connection or not callable(getattr(connection, "can_read", None)):
            # Not the Redis transport, or nothing in flight.
            continue
        try:
            if not connection.can_read(timeout=IN_FLIGHT_GRACE):
                # Still blocked on queues nothing was put back on.
                continue
            reply = connection.read_response()
            if not reply:
                # It timed out empty.
                continue
            key, item = reply
            with channel.conn_or_acquire() as client:
                # Its place: the end BRPOP takes from.
                client.rpush(key, item)
        except Exception:
            log.exception("graceful: could not take back the message the worker's connection was fetching")
            continue
        name, task_id = _named(item)
        log.warning(
            "celery task %s[%s] taken by this worker as it stopped: put back on its queue", name, task_id
        )
        lines.append(
            f"  - task {name} id {task_id}, taken off its queue as the worker stopped: put back on its queue"
        )
    return lines


def _named(item: bytes | str) -> tuple[str, str]:
    """The task name and id of a raw kombu Redis payload, or "?"."""
    try:
        headers = json.loads(item)["headers"]
        return str(headers.get("task", "?")), str(headers.get("id", "?"))
    except (ValueError, KeyError, TypeError):
        return "?", "?"


def send_again(app: Any, messages: list[Any]) -> list[str]:
    """Publish each message again, as it came (body, headers, properties), on the exchange and
    routing key it was delivered with, over a connection of our own; an error per message."""
    errors = ["not sent"] * len(messages)
    try:
        with app.connection_for_write() as connection:
            producer = connection.Producer()
            for i, message in enumerate(messages):
                info = message.delivery_info or {}
                properties = message.properties or {}
                try:
                    producer.publish(
                        message.body,
                        exchange=info.get("exchange") or "",
                        routing_key=info.get("routing_key") or "",
                        headers=message.headers,
                        content_type=message.content_type,
                        content_encoding=message.content_encoding,
                        priority=properties.get("priority"),
                        correlation_id=properties.get("correlation_id"),
                        reply_to=properties.get("reply_to"),
                        retry=True,
                        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.1},
                    )
                    errors[i] = ""
                except Exception as exc:  # noqa: BLE001 - said in the report, the others go on
                    errors[i] = repr(exc)
    except Exception as exc:  # noqa: BLE001 - no connection, or it broke: said for each unsent
        errors = [e and repr(exc) for e in errors]
    return errors
