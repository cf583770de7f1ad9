"""Misuse (issue #15): bad input is a clear error at the call, naming what is accepted, and
nothing has changed when it is raised."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import socket
import threading
import warnings
from collections.abc import AsyncIterator, Iterator

import pytest

import graceful
from graceful import Lifecycle, State, lowlevel

from .conftest import BOUND, ROOT, Recorder, run_python

pytestmark = pytest.mark.timeout(60)


def _gen() -> Iterator[int]:
    yield 1


async def _agen() -> AsyncIterator[int]:
    yield 1


class _Holder:
    def gen(self) -> Iterator[int]:
        yield 1


def _new() -> Lifecycle:
    return Lifecycle(force_quit=BOUND, exit=Recorder())


BAD_LISTENERS = [
    pytest.param(_gen, "generator function", id="generator"),
    pytest.param(_agen, "generator function", id="async-generator"),
    pytest.param(_Holder().gen, "generator function", id="generator-method"),
    pytest.param(lambda x: x, "no arguments", id="lambda-x"),
    pytest.param(42, "callable with no arguments", id="not-callable"),
]


@pytest.mark.parametrize("adder", ["add_wrap_up_listener", "add_shutdown_listener"])
@pytest.mark.parametrize(("fn", "says"), BAD_LISTENERS)
def test_bad_listener_is_rejected_at_registration(adder: str, fn: object, says: str) -> None:
    """A generator function, a callable needing arguments or a non-callable is a TypeError."""
    lc = _new()
    with pytest.raises(TypeError, match=says):
        getattr(lc, adder)(fn)
    assert not lc.status().listeners
    assert lc.state() is State.RUNNING


@pytest.mark.parametrize("name", [123, b"x", ["a"]])
def test_listener_name_must_be_str(name: object) -> None:
    """``name=`` other than a str (or None) is a TypeError that says it takes a str."""
    lc = _new()
    with pytest.raises(TypeError, match="takes a str"):
        lc.add_wrap_up_listener(lambda: None, name=name)  # type: ignore[arg-type]
    assert not lc.status().listeners


def test_async_def_listener_is_accepted() -> None:
    """An ``async def`` with no parameters is a fine listener (the check is not too strict)."""

    async def listener() -> None:
        return None

    lc = _new()
    waiter = lc.add_wrap_up_listener(listener)
    assert waiter.name.endswith("listener")


BAD_TIMEOUTS = [
    pytest.param("5", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(float("inf"), ValueError, id="inf"),
    pytest.param(1e308, ValueError, id="1e308"),
    pytest.param(10**400, ValueError, id="10**400"),
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param(-1, ValueError, id="negative"),
]


@pytest.mark.parametrize(("timeout", "error"), BAD_TIMEOUTS)
def test_shutdown_bad_timeout_rejected_before_anything_starts(timeout: object, error: type) -> None:
    """``shutdown(timeout=bad)`` raises and the lifecycle is still RUNNING."""
    lc = _new()
    with pytest.raises(error, match="timeout=None waits as long as it takes"):
        lc.shutdown(timeout=timeout)  # type: ignore[arg-type]
    assert lc.state() is State.RUNNING
    assert not lc.is_stopping()


@pytest.mark.parametrize("wait", ["no", None, 0, 1, "False"])
def test_shutdown_wait_takes_only_a_bool(fresh: Lifecycle, wait: object) -> None:
    """``shutdown(wait="no")`` (truthy: it would block) or ``wait=None`` is a TypeError, and the
    lifecycle is still RUNNING (issue #27, item 9)."""
    with pytest.raises(TypeError, match=r"shutdown\(wait=...\) takes True or False"):
        fresh.shutdown(wait=wait)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes True or False"):
        graceful.shutdown(wait=wait)  # type: ignore[arg-type]
    assert fresh.state() is State.RUNNING
    assert not fresh.is_stopping()


@pytest.mark.parametrize(("timeout", "error"), BAD_TIMEOUTS)
@pytest.mark.parametrize("method", ["wait_for_shutdown", "wait_for_wrap_up", "join", "wait_until_idle"])
def test_wait_bad_timeout_rejected(method: str, timeout: object, error: type) -> None:
    """Every blocking wait of a Lifecycle checks its timeout the same way."""
    lc = _new()
    wait = getattr(lc, method, None) or functools.partial(getattr(lowlevel, method), lc)
    with pytest.raises(error, match="number of seconds"):
        wait(timeout)
    assert lc.state() is State.RUNNING


@pytest.mark.parametrize(("timeout", "error"), BAD_TIMEOUTS)
def test_waiter_bad_timeout_rejected(timeout: object, error: type) -> None:
    """``Waiter.wait(bad)`` raises as ``Lifecycle.wait_for_shutdown`` does."""
    waiter = _new().add_wrap_up_listener(lambda: None)
    with pytest.raises(error, match="number of seconds"):
        waiter.wait(timeout)  # type: ignore[arg-type]
    assert not waiter.done()


@pytest.mark.parametrize(("timeout", "error"), BAD_TIMEOUTS)
@pytest.mark.parametrize("function", ["wait_for_shutdown", "wait_for_wrap_up"])
def test_module_level_waits_check_timeout(
    fresh: Lifecycle, function: str, timeout: object, error: type
) -> None:
    """``graceful.wait_for_shutdown(bad)`` and ``graceful.wait_for_wrap_up(bad)`` raise."""
    with pytest.raises(error, match="number of seconds"):
        getattr(graceful, function)(timeout)
    assert fresh.state() is State.RUNNING


def test_timeout_zero_is_a_non_blocking_check() -> None:
    """``timeout=0`` is accepted everywhere and checks without waiting, as ``Event.wait(0)``."""
    lc = _new()
    waiter = lc.add_wrap_up_listener(lambda: None)
    assert lc.wait_for_shutdown(0) is False
    assert lc.wait_for_wrap_up(0) is False
    assert waiter.wait(0) is False
    assert lc.shutdown(timeout=BOUND) is True
    assert lc.wait_for_shutdown(0) is True
    assert lc.wait_for_wrap_up(0) is True
    assert waiter.wait(0) is True


def test_wait_for_wrap_up_exists_and_wakes(fresh: Lifecycle) -> None:
    """``graceful.wait_for_wrap_up()`` returns True once wrap-up begins (no polling)."""
    woke = threading.Event()

    def worker() -> None:
        if graceful.wait_for_wrap_up(BOUND):
            woke.set()

    thread = threading.Thread(target=worker)
    thread.start()
    graceful.shutdown(wait=False)
    thread.join(BOUND)
    assert woke.is_set()


def test_wait_for_wrap_up_async_exists_and_wakes(fresh: Lifecycle) -> None:
    """``await graceful.wait_for_wrap_up_async()`` returns True once wrap-up begins."""

    async def main() -> bool:
        waiting = asyncio.ensure_future(graceful.wait_for_wrap_up_async())
        await asyncio.sleep(0)
        assert not waiting.done()
        graceful.shutdown(wait=False)
        return await asyncio.wait_for(waiting, BOUND)

    assert asyncio.run(main()) is True


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(
            lambda: Lifecycle(clock="x"), "monotonic\\(\\), call_at\\(\\) and wait_until\\(\\)", id="clock"
        ),  # type: ignore[arg-type]
        pytest.param(lambda: Lifecycle(exit="x"), "takes a callable", id="exit"),  # type: ignore[arg-type]
        pytest.param(lambda: Lifecycle(force_quit="5"), "number of seconds", id="force_quit-str"),  # type: ignore[arg-type]
        pytest.param(lambda: graceful.signal_handlers("oops"), "graceful.Lifecycle", id="signal_handlers"),  # type: ignore[arg-type]
        pytest.param(
            lambda: graceful.run(lambda: None, lifecycle="oops"),  # type: ignore[arg-type]
            "graceful.Lifecycle",
            id="run-lifecycle",
        ),
    ],
)
def test_bad_constructor_arguments_are_type_errors(make: object, says: str) -> None:
    """A wrong type for clock=, exit=, force_quit= or lifecycle= is a TypeError naming what fits."""
    with pytest.raises(TypeError, match=says):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(
    "budget", [float(threading.TIMEOUT_MAX) * 2, 1e308, 10**400, float("inf"), float("nan"), 0, -1]
)
def test_budget_out_of_range_rejected(budget: float) -> None:
    """A budget of 0, negative, NaN, infinite or above ``threading.TIMEOUT_MAX`` is a ValueError."""
    lc = _new()
    with pytest.raises(ValueError, match="at most"):
        lc.set_time_to_force_quit(budget)
    assert lowlevel.budget(lc) == BOUND
    with pytest.raises(ValueError, match="at most"):
        Lifecycle(force_quit=budget)


def test_env_budget_too_large_is_a_clear_error_when_run_starts() -> None:
    """``GRACEFUL_FORCE_QUIT=1e10`` fails ``run()`` (not ``import graceful``) with a ValueError
    naming the variable, before anything starts."""
    result = run_python(
        "import graceful; print('imported', flush=True); graceful.run(lambda: None)",
        env={"GRACEFUL_FORCE_QUIT": "1e10"},
    )
    assert result.stdout == "imported\n"
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: GRACEFUL_FORCE_QUIT"), result.stderr
    assert "at most" in last


# -- run(): every argument checked before anything changes ----------------------------------


def test_run_generator_function_is_type_error_at_the_call() -> None:
    """``run(generator_function)`` raises TypeError at once; the budget and state are untouched."""
    lc = _new()
    with pytest.raises(TypeError, match="generator function"):
        graceful.run(_gen, force_quit=3, handle_signals=False, lifecycle=lc)
    assert lowlevel.budget(lc) == BOUND
    assert lc.state() is State.RUNNING


def test_run_callable_needing_arguments_is_type_error_at_the_call() -> None:
    """``run(fn)`` with a required parameter raises TypeError saying it takes no arguments."""
    lc = _new()
    with pytest.raises(TypeError, match="no arguments"):
        graceful.run(lambda port: None, handle_signals=False, lifecycle=lc)
    assert lc.state() is State.RUNNING


def test_run_async_function_not_called_is_run(fresh: Lifecycle) -> None:
    """``run(main)`` with an uncalled ``async def main()`` runs it, like ``run(main())``."""
    ran = threading.Event()

    async def main() -> None:
        ran.set()
        await graceful.wait_for_wrap_up_async()

    def stop_once_running() -> None:
        if ran.wait(BOUND):
            fresh.shutdown("test", wait=False)

    stopper = threading.Thread(target=stop_once_running)
    stopper.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = graceful.run(main, handle_signals=False)
        gc.collect()
    stopper.join(BOUND)
    assert ran.is_set()
    assert code == 0
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_run_async_function_is_cancelled_at_wrap_up(fresh: Lifecycle) -> None:
    """An uncalled ``async def`` that awaits forever is cancelled at wrap-up, as a coroutine is."""
    cancelled = threading.Event()
    ran = threading.Event()

    async def forever() -> None:
        ran.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def stop_once_running() -> None:
        if ran.wait(BOUND):
            fresh.shutdown("test", wait=False)

    stopper = threading.Thread(target=stop_once_running)
    stopper.start()
    assert graceful.run(forever, handle_signals=False) == 0
    stopper.join(BOUND)
    assert cancelled.is_set()


def test_run_off_main_thread_raises_before_changing_the_budget() -> None:
    """``run(force_quit=3)`` off the main thread raises RuntimeError and leaves the budget alone."""
    lc = _new()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            graceful.run(lambda: None, force_quit=3, lifecycle=lc)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(BOUND)
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert "handle_signals=False" in str(errors[0])
    assert lowlevel.budget(lc) == BOUND
    assert lc.state() is State.RUNNING


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        pytest.param({"handle_signals": "yes"}, TypeError, "True or False", id="handle_signals"),
        pytest.param({"server": []}, ValueError, "at least one server", id="empty-list"),
        pytest.param({"server": object()}, TypeError, "does not know how to run", id="unknown"),
        pytest.param({"server": [lambda: None, _agen]}, TypeError, "generator function", id="second-bad"),
    ],
)
def test_run_bad_arguments_leave_the_budget_alone(kwargs: dict[str, object], error: type, says: str) -> None:
    """Whatever argument of ``run()`` is bad, ``force_quit=`` has not been applied."""
    lc = _new()
    call: dict[str, object] = {"server": lambda: None, "handle_signals": False, **kwargs}
    with pytest.raises(error, match=says):
        graceful.run(call.pop("server"), force_quit=3, lifecycle=lc, **call)  # type: ignore[arg-type]
    assert lowlevel.budget(lc) == BOUND
    assert lc.state() is State.RUNNING


# -- waiting for STOPPED from inside a served callable --------------------------------------

DEADLOCK = """
import graceful

def serve():
    for call in (graceful.wait_for_shutdown, graceful.shutdown):
        try:
            call()
        except RuntimeError as exc:
            print("refused:", exc, flush=True)
    assert graceful.wait_for_shutdown(0) is False  # 0 only looks: allowed
    graceful.shutdown(wait=False)
    graceful.wait_for_wrap_up()
    print("returning", flush=True)

raise SystemExit(graceful.run(serve))
"""


def test_waiting_for_shutdown_inside_a_served_callable_raises() -> None:
    """``wait_for_shutdown()``/``shutdown()`` in run()'s callable raise instead of deadlocking."""
    result = run_python(DEADLOCK, env={"GRACEFUL_FORCE_QUIT": "20"})
    assert result.returncode == 0, result.stderr
    refusals = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 2, result.stdout
    assert refusals[0].startswith("refused: wait_for_shutdown() was called from server")
    assert refusals[1].startswith("refused: shutdown() was called from server")
    assert all("use graceful.wait_for_wrap_up() to wait for the stop, then return" in r for r in refusals)
    assert "returning" in result.stdout


def test_waiting_for_shutdown_from_another_thread_still_blocks() -> None:
    """The refusal is for the serving thread only: an ordinary thread still waits and wakes."""
    lc = _new()
    woke = threading.Event()

    def wait() -> None:
        if lc.wait_for_shutdown(BOUND):
            woke.set()

    thread = threading.Thread(target=wait)
    thread.start()
    assert lc.shutdown(timeout=BOUND)
    thread.join(BOUND)
    assert woke.is_set()


# -- a port already in use ------------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_run_logs_address_in_use_in_one_line(taken_port: int, caplog: pytest.LogCaptureFixture) -> None:
    """A server failing with EADDRINUSE gets one error line, no traceback, and exit code 1."""
    lc = _new()

    def serve() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", taken_port))

    caplog.set_level(logging.INFO, logger="graceful")
    assert graceful.run(serve, handle_signals=False, lifecycle=lc) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is None
    assert "could not start" in errors[0].getMessage()
    assert "already in use" in errors[0].getMessage().lower()


def test_demo_on_a_taken_port_says_so_in_one_line(taken_port: int) -> None:
    """The demo on a port in use logs one line naming the address and exits 1, no traceback."""
    demo = ROOT / "examples" / "demo.py"
    code = f"import runpy; runpy.run_path({str(demo)!r}, run_name='__main__')"
    result = run_python(code, env={"PORT": str(taken_port), "HOST": "127.0.0.1"})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot serve on 127.0.0.1:{taken_port}" in result.stderr
    assert "already in use" in result.stderr.lower()
