"""What a human reads: the force-quit report, the SIGUSR1 dump, and graceful's log by default.

Why: uber-go/fx removed the line that named the slow hook on a stop timeout, and its users
asked for it back; go-zero's "Still alive after ..." reads like an error and says nothing of
who is stuck. A graceful report names every unfinished listener, its phase, how long it has run
and *where* it is: the current stack of the thread running it (and, for an ``async def``
listener, the chain of coroutines it is awaiting). The SIGUSR1 dump shows every thread as a
thread dump, not as a traceback, so nobody mistakes it for a crash.

graceful's log lines must be seen too. Python prints nothing below WARNING until a program
configures logging, and a service under ``uvicorn app:app`` or the README's ``graceful.run``
snippet never does: not one graceful line appeared ("Observable" in name only). uvicorn and
gunicorn give their own loggers a handler when nobody configured them; ``run()`` and the hosts
do the same for ``graceful`` (:func:`log_to_stderr_by_default`), and stand aside for good the
moment the application configures logging, even later (Celery configures it just after its
``worker_init``): never a line printed twice, never a level the application did not choose.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from types import FrameType

from ._checks import TYPE_CHECKING
from ._listeners import ListenerState, Phase

if TYPE_CHECKING:
    from ._listeners import Listener

__all__ = [
    "DEFAULT_LOG_FORMAT",
    "coroutine_lines",
    "dump_threads",
    "emit_report",
    "flush_logging",
    "format_report",
    "format_sections",
    "format_thread_stacks",
    "format_unfinished",
    "frame_lines",
    "listener_stack",
    "log_to_stderr_by_default",
    "write_fd2",
    "write_stderr",
]

log = logging.getLogger("graceful")

LOG_GRACE = 1.0
"""Seconds the report's logging gets (a stuck thread may hold a handler's lock)."""


_POOL_RUN = (os.path.join("graceful", "_listeners.py"), "run")
"""Where graceful's pool calls a listener: the frames up to it are graceful's, not the user's."""


def frame_lines(
    frame: FrameType | None,
    indent: str,
    inner_from: tuple[str, str | None] | None = None,
    outer: str | None = None,
) -> list[str]:
    """A thread's stack as the report prints it, innermost last.

    ``inner_from`` (a file's path ending, and a function name or None for any): only the frames
    after the last call in that file, the user's own code, are printed; the ones above it are
    the same in every report (graceful's pool, Celery's tracer, Dramatiq's actor call). With
    ``outer``, one line first says how many were left out and whose they are.
    """
    if frame is None:
        return [f"{indent}(no Python frame: the thread has finished or is outside Python)"]
    frames: list[traceback.FrameSummary] = list(traceback.extract_stack(frame))
    out: list[str] = []
    if inner_from is not None:
        path, name = inner_from
        calls = [i for i, f in enumerate(frames) if f.filename.endswith(path) and name in (None, f.name)]
        if calls and calls[-1] + 1 < len(frames):
            cut = calls[-1] + 1
            frames = frames[cut:]
            if outer:
                out.append(f"{indent}({cut} outer frames of {outer})")
    for entry in traceback.format_list(frames):
        out.extend(indent + line for line in entry.rstrip("\n").split("\n"))
    return out


def coroutine_lines(awaitable: object, indent: str) -> list[str]:
    """``file:line in function`` for each coroutine in an await chain, outermost first (the
    report's asyncio tasks; the arq host names its jobs with it)."""
    out: list[str] = []
    current: object = awaitable
    # An await chain is short; a bound guards against odd objects.
    for _ in range(64):
        frame = getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None)
        if frame is None:
            break
        out.append(
            f'{indent}File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}'
        )
        current = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)
    return out


def listener_stack(listener: Listener, indent: str = "      ") -> list[str]:
    """Where ``listener`` is now: the stack of the thread running it from the listener's own
    code inward (the frames of graceful's pool above it are the same in every report), then,
    for an ``async def`` one, the chain of coroutines it awaits."""
    lines = frame_lines(sys._current_frames().get(listener.thread_id or 0), indent, inner_from=_POOL_RUN)
    chain = coroutine_lines(listener.awaiting(), indent)
    if chain:
        lines.append(f"{indent[:-2]}awaiting:")
        lines.extend(chain)
    return lines


def format_unfinished(listeners: Iterable[Listener], now: float) -> list[str]:
    """The listener part of the force-quit report: what runs (abandoned ones included, with
    when they were abandoned: a thread cannot be stopped) and what never started."""
    names = {t.ident: t.name for t in threading.enumerate()}
    running: list[str] = []
    waiting: list[str] = []
    for listener in listeners:
        label = f"{listener.phase} listener {listener.name!r}"
        bound = "" if listener.timeout is None else f", timeout {listener.timeout:g} s"
        if listener.is_alive() and listener.started is not None:
            thread = names.get(listener.thread_id, "?")
            left = (
                ""
                if listener.abandoned_at is None
                else f", abandoned {now - listener.abandoned_at:.3f} s ago and still running"
            )
            running.append(
                f"  - {label}: running for {now - listener.started:.3f} s{bound}{left} "
                f"in thread {thread!r} (id {listener.thread_id}), at:"
            )
            running.extend(listener_stack(listener))
        elif listener.state is ListenerState.PENDING and listener.phase is Phase.FLUSH:
            waiting.append(f"  - {label}: not run yet: it runs in the flush slice after this report{bound}")
        elif listener.state is ListenerState.PENDING:
            waiting.append(f"  - {label}: never started{bound}")
    lines: list[str] = []
    if running:
        lines.append("Still running:")
        lines.extend(running)
    if waiting:
        lines.append("Not started:")
        lines.extend(waiting)
    if not lines:
        lines.append("No listener was still running.")
    return lines


def format_report(  # noqa: PLR0917 - the report's parts, in the order they are printed
    why: str,
    since: float | None,
    triggers: list[str],
    code: int,
    listeners: Iterable[Listener],
    now: float,
) -> str:
    """The force-quit report: a header line, then every unfinished listener and where it is."""
    began = "" if since is None else f"; shutdown began {since:.3f} s ago ({' then '.join(triggers)})"
    header = f"graceful: force quit: {why}{began}. Exiting with code {code}."
    return "\n".join([header, *format_unfinished(listeners, now)])


def format_sections(sections: Iterable[Callable[[], list[str]]]) -> list[str]:
    """The extra report sections' lines; one that raises becomes a line that says so."""
    out: list[str] = []
    for section in sections:
        try:
            out.extend(str(line) for line in section())
        except Exception as exc:  # noqa: BLE001 - the report must go out whatever a section does
            out.append(f"(a report section failed: {exc!r})")
    return out


def format_thread_stacks(threads: Iterable[threading.Thread], title: str) -> list[str]:
    """``title``, then the stack of each thread of ``threads`` that is still alive."""
    frames = sys._current_frames()
    out: list[str] = []
    for thread in threads:
        if not thread.is_alive():
            continue
        if not out:
            out.append(title)
        out.append(f'  Thread "{thread.name}" id {thread.ident}:')
        out.extend(frame_lines(frames.get(thread.ident or 0), "    "))
    return out


def _task_lines() -> list[str]:
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return []
    lines: list[str] = []
    for loop in _known_loops():
        try:
            tasks = asyncio.all_tasks(loop)
        except RuntimeError:  # pragma: no cover - the loop was closed while we looked
            continue
        lines.append(f"asyncio tasks of {loop!r}: {len(tasks)}")
        for task in sorted(tasks, key=lambda t: t.get_name()):
            lines.append(f"  task {task.get_name()!r}: {task.get_coro()!r}")
            lines.extend(coroutine_lines(task.get_coro(), "      "))
    return lines


_loops: list[object] = []


def remember_loop(loop: object) -> None:
    """Let the SIGUSR1 dump list this loop's tasks (``run()`` calls it for its loop)."""
    if loop not in _loops:
        _loops.append(loop)


def forget_loop(loop: object) -> None:
    if loop in _loops:
        _loops.remove(loop)


def _known_loops() -> list[object]:
    return [loop for loop in _loops if not getattr(loop, "is_closed", lambda: True)()]


def dump_threads(status_text: str) -> str:
    """Every thread's stack, the asyncio tasks of known loops, and the status: for SIGUSR1."""
    frames = sys._current_frames()
    lines = ["graceful: thread dump (SIGUSR1); the process keeps running", status_text]
    for thread in threading.enumerate():
        daemon = " daemon" if thread.daemon else ""
        lines.append(f'Thread "{thread.name}" id {thread.ident}{daemon}:')
        lines.extend(frame_lines(frames.get(thread.ident or 0), "    "))
    lines.extend(_task_lines())
    lines.append("graceful: end of thread dump")
    return "\n".join(lines) + "\n"


# -- getting a report out ---------------------------------------------------------------------


def write_fd2(text: str) -> bool:
    """Write ``text`` straight to fd 2: no stream and no lock (a stuck thread may hold one), and
    past any redirect of ``sys.stderr`` (Celery sends it to logging). False if fd 2 is unusable."""
    data = text.encode("utf-8", "replace")
    try:
        # os.write may write part of it to a pipe.
        while data:
            data = data[os.write(2, data) :]
    except OSError:
        return False
    return True


def write_stderr(text: str) -> None:
    """Write ``text`` to stderr without any lock a user thread can hold, when stderr is the
    process's own (fd 2); to the replacement stream otherwise (a test's capture, say)."""
    stream = sys.stderr
    own = stream is None or stream is sys.__stderr__
    # Done unless fd 2 is unusable: then fall back to the stream, if any.
    if own and (write_fd2(text) or stream is None):
        return
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):  # pragma: no cover - a closed or broken stream at exit
        pass


def _writes_to_stderr(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return stream is not None and stream in (sys.stderr, sys.__stderr__)


def _log_elsewhere(text: str) -> None:
    """Log ``text`` at CRITICAL to every handler of the ``graceful`` logger's chain that does
    not print to stderr (the report is there already): files, syslog, a collector."""
    # The logger's name says "graceful" already: no "graceful: graceful: force quit" in a log.
    record = log.makeRecord(
        log.name, logging.CRITICAL, __file__, 0, "%s", (text.removeprefix("graceful: "),), None
    )
    current: logging.Logger | None = log
    while current is not None:
        for handler in current.handlers:
            if not _writes_to_stderr(handler) and record.levelno >= handler.level:
                handler.handle(record)
                handler.flush()
        if not current.propagate:
            break
        current = current.parent


def emit_report(report: str, timeout: float = LOG_GRACE) -> threading.Event:
    """Put the force-quit report on stderr first, then on the ``graceful`` logger, bounded.

    The thread that is stuck may hold logging's module lock or a handler's lock (gunicorn
    #3198, celery #7339 are about exactly those locks): the report goes straight to fd 2,
    taking no lock at all, and only then to the logging handlers that do not print to stderr,
    from a helper thread given ``timeout`` seconds here (the caller may wait longer on the
    event returned, set once the logging copy is done). A blocked handler costs its copy of the
    report, never the report; so does a process that cannot start one more thread.
    """
    write_stderr(report + "\n")
    done = threading.Event()

    def log_it() -> None:
        try:
            _log_elsewhere(report)
        finally:
            done.set()

    if not _start_daemon(log_it, "graceful-force-quit-log"):
        write_fd2("graceful: no thread for the report's logging copy (thread limit): stderr only\n")
        done.set()
    done.wait(timeout)
    return done


def _start_daemon(target: Callable[[], object], name: str) -> bool:
    try:
        threading.Thread(target=target, name=name, daemon=True).start()
    except RuntimeError:
        # "can't start new thread": at the process's thread limit.
        return False
    return True


def _handlers() -> list[logging.Handler]:
    """Every handler of every logger logging knows of (a copy: no lock taken to read it)."""
    loggers: list[object] = [logging.getLogger(), *list(logging.Logger.manager.loggerDict.values())]
    seen: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", ())):
            seen.setdefault(id(handler), handler)
    return list(seen.values())


def flush_logging() -> int:
    """Flush every logging handler whose lock is free, and stdout and stderr; never wait on a
    lock a stuck thread may hold. What ``os._exit`` would otherwise throw away. Returns how
    many handlers were skipped because their lock was held."""
    skipped = 0
    for handler in _handlers():
        lock = handler.lock
        if lock is None:
            handler.flush()
            continue
        if not lock.acquire(blocking=False):
            skipped += 1
            continue
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - a broken handler must not cost the others their flush
            skipped += 1
        finally:
            lock.release()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            # Closed, or a broken pipe: nothing more to save.
            pass
    return skipped


# -- graceful's log, when nobody configured logging ------------------------------------------------

DEFAULT_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
"""The format of graceful's own handler: short, like uvicorn's default (``INFO graceful: ...``);
journald and container runtimes add the time."""

_default_lock = threading.Lock()


class _DefaultLog(logging.Filter):
    """graceful's own stderr handler, and the filter that retires it once logging is configured.

    Set on the ``graceful`` logger and on the handler. While nothing else is configured it lets
    every record through to the handler. Once the root logger or the ``graceful`` logger has a
    handler of the application's, it takes the handler, itself and the INFO level it set off the
    logger, and judges the record in hand by the level the application's configuration gives:
    from then on graceful's logger is as the application left it.
    """

    def __init__(self, logger: logging.Logger, set_level: bool) -> None:
        super().__init__()
        self.logger = logger
        self.set_level = set_level
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter(DEFAULT_LOG_FORMAT))
        self.handler.addFilter(self)
        self.retired = False

    def install(self) -> None:
        self.logger.addHandler(self.handler)
        self.logger.addFilter(self)
        if self.set_level:
            self.logger.setLevel(logging.INFO)

    def configured(self) -> bool:
        """True once the application has a handler of its own for graceful's records."""
        return bool(logging.getLogger().handlers) or self.logger.handlers != [self.handler]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.retired:
            # The handler's copy of a record the logger's filter let through.
            return False
        if not self.configured():
            return True
        self.retire()
        return record.levelno >= self.logger.getEffectiveLevel()

    def retire(self) -> None:
        with _default_lock:
            if self.retired:
                return
            self.retired = True
            # A new list, not removeHandler(): callHandlers may be iterating over the old one.
            self.logger.handlers = [h for h in self.logger.handlers if h is not self.handler]
            self.logger.removeFilter(self)
            if self.set_level and self.logger.level == logging.INFO:
                self.logger.setLevel(logging.NOTSET)


def log_to_stderr_by_default() -> bool:
    """Give the ``graceful`` logger a handler on stderr at INFO, unless logging is configured.

    "Configured": the ``graceful`` logger or the root logger has a handler, or ``graceful`` does
    not propagate; then nothing is touched (nor when there is no stderr: ``pythonw``). Otherwise one ``StreamHandler`` on stderr with
    :data:`DEFAULT_LOG_FORMAT`, and the level INFO unless the application set one. It retires
    by itself once the application configures logging (see ``_DefaultLog``). ``run()`` and the
    ASGI and Celery hosts call it when they start, before they log anything; idempotent.
    Returns True when it installed the handler now.
    """
    logger = logging.getLogger("graceful")
    root = logging.getLogger()
    with _default_lock:
        if logger.handlers or root.handlers or not logger.propagate or sys.stderr is None:
            return False
        _DefaultLog(logger, set_level=logger.level == logging.NOTSET).install()
    return True
