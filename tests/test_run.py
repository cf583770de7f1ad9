"""graceful.run(): every kind of server, every way it can end, handlers restored."""

from __future__ import annotations

import asyncio
import logging
import signal
import socketserver
import threading

import pytest

import graceful
from graceful import Lifecycle, State
from graceful._signals import handled_signals
from graceful.adapters import CallableService, CoroutineService, SocketServerService, StartStopService, adapt

from .conftest import BOUND, Recorder

pytestmark = pytest.mark.never_forced  # no test here may reach the force-quit deadline


def handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in handled_signals()}


@pytest.mark.timeout(30)
def test_a_server_returning_runs_the_full_sequence_and_restores_handlers(fresh: Lifecycle) -> None:
    before = handlers()
    calls: list[str] = []
    fresh.add_shutdown_listener(lambda: calls.append("closed"))
    assert graceful.run(lambda: calls.append("served")) == 0
    assert calls == ["served", "closed"]
    assert fresh.state() is State.STOPPED
    assert "exited" in (fresh.status().reason or "")
    assert handlers() == before
    previous_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(previous_fd)
    assert previous_fd == -1


@pytest.mark.timeout(30)
def test_a_server_raising_gives_exit_code_1_and_a_logged_traceback(
    fresh: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    closed = threading.Event()
    fresh.add_shutdown_listener(closed.set)

    def crash() -> None:
        raise ConnectionError("database went away")

    assert graceful.run(crash) == 1
    assert closed.is_set()
    crashed = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert crashed
    assert crashed[0].exc_info is not None


@pytest.mark.timeout(30)
def test_keyboard_interrupt_from_a_server_is_a_graceful_shutdown(fresh: Lifecycle) -> None:
    closed = threading.Event()
    fresh.add_shutdown_listener(closed.set)

    def interrupted() -> None:
        raise KeyboardInterrupt

    assert graceful.run(interrupted) == 0
    assert closed.is_set()
    assert fresh.status().reason == "KeyboardInterrupt"


@pytest.mark.timeout(30)
def test_shutdown_from_another_thread_stops_a_polling_callable(fresh: Lifecycle) -> None:
    started = threading.Event()

    def serve() -> None:
        started.set()
        while not graceful.is_stopping():
            threading.Event().wait(0.01)

    def stopper() -> None:
        assert started.wait(BOUND)
        assert graceful.shutdown("from a thread", timeout=BOUND)

    thread = threading.Thread(target=stopper)
    thread.start()
    assert graceful.run(serve) == 0
    thread.join(BOUND)
    assert fresh.status().reason == "from a thread"


@pytest.mark.timeout(30)
def test_a_real_signal_during_run_is_routed(fresh: Lifecycle) -> None:
    stopping = threading.Event()
    fresh.add_wrap_up_listener(stopping.set)

    def serve() -> None:
        signal.raise_signal(signal.SIGTERM)
        assert stopping.wait(BOUND)

    before = handlers()
    assert graceful.run(serve) == 0
    assert fresh.status().reason == "SIGTERM"
    assert handlers() == before


@pytest.mark.timeout(30)
def test_several_servers_one_crashes_all_stop_in_reverse_order(fresh: Lifecycle) -> None:
    order: list[str] = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name
            self.stop = threading.Event()

        def serve(self, ctx: graceful.Context) -> None:
            ctx.started()
            self.stop.wait(BOUND)

        def wrap_up(self, ctx: graceful.Context) -> None:
            order.append(f"wrap up {self.name}")
            self.stop.set()

        def close(self, ctx: graceful.Context) -> None:
            order.append(f"close {self.name}")

    def crashing() -> None:
        raise RuntimeError("boom")

    assert graceful.run([Named("a"), Named("b"), crashing]) == 1
    assert order == ["wrap up b", "wrap up a", "close b", "close a"]


@pytest.mark.timeout(30)
def test_a_coroutine_runs_on_a_loop_in_the_main_thread_and_is_cancelled_at_wrap_up(fresh: Lifecycle) -> None:
    seen: dict[str, object] = {}

    async def main() -> None:
        seen["thread"] = threading.current_thread()
        try:
            graceful.shutdown("coroutine asked", wait=False)
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise

    async def close_async() -> None:
        seen["closed on loop"] = asyncio.get_running_loop().is_running()

    fresh.add_shutdown_listener(close_async)
    assert graceful.run(main()) == 0
    assert seen == {"thread": threading.main_thread(), "cancelled": True, "closed on loop": True}


@pytest.mark.timeout(30)
def test_a_coroutine_returning_on_its_own_stops_everything(fresh: Lifecycle) -> None:
    async def main() -> None:
        await asyncio.sleep(0)

    assert graceful.run(main()) == 0
    assert "exited" in (fresh.status().reason or "")


@pytest.mark.timeout(30)
def test_an_async_server_crash_gives_exit_code_1(fresh: Lifecycle) -> None:
    async def crash() -> None:
        raise RuntimeError("async boom")

    assert graceful.run(crash()) == 1


@pytest.mark.timeout(30)
def test_an_async_service_that_raises_keyboard_interrupt_is_graceful(
    fresh: Lifecycle,
) -> None:
    class Interrupted:
        name = "interrupted"

        async def serve(self, ctx: graceful.Context) -> None:
            ctx.started()
            raise KeyboardInterrupt

        async def wrap_up(self, ctx: graceful.Context) -> None:
            return None

        async def close(self, ctx: graceful.Context) -> None:
            return None

    lifecycle = fresh
    assert graceful.run(Interrupted()) == 0
    assert lifecycle.status().reason == "KeyboardInterrupt"


def test_a_coroutine_service_wrap_up_before_it_started_is_harmless(fresh: Lifecycle) -> None:
    from graceful.adapters import CoroutineService

    async def never() -> None:
        return None

    coro = never()
    service = CoroutineService(coro, name="never")
    lifecycle = fresh
    ctx = graceful.Context(lifecycle, "never")
    asyncio.run(service.wrap_up(ctx))
    asyncio.run(service.close(ctx))
    coro.close()


@pytest.mark.timeout(30)
def test_mixed_sync_and_async_servers(fresh: Lifecycle) -> None:
    def worker() -> None:
        while not graceful.is_stopping():
            threading.Event().wait(0.01)

    async def api() -> None:
        graceful.shutdown(wait=False)
        await asyncio.sleep(BOUND)

    assert graceful.run([worker, api()]) == 0


@pytest.mark.timeout(30)
def test_socketserver_and_start_stop_objects(fresh: Lifecycle) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            return None

    server = socketserver.TCPServer(("127.0.0.1", 0), Handler)

    class Engine:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def start(self) -> None:
            self.calls.append("start")
            graceful.shutdown(wait=False)

        def stop(self) -> None:
            self.calls.append("stop")

    class Loop:
        """Not a socketserver, but shaped like one: the generic SocketServerService runs it."""

        def __init__(self) -> None:
            self.stopped = threading.Event()
            self.closed = False

        def serve_forever(self) -> None:
            self.stopped.wait(BOUND)

        def shutdown(self) -> None:
            self.stopped.set()

        def server_close(self) -> None:
            self.closed = True

    engine, loop = Engine(), Loop()
    assert isinstance(adapt(loop), SocketServerService)
    assert graceful.run([server, loop, engine]) == 0
    assert engine.calls == ["start", "stop"]
    assert server.socket.fileno() == -1  # server_close() ran
    assert loop.closed


def test_adapt_picks_the_right_shape() -> None:
    async def coro() -> None:
        return None

    c = coro()
    assert isinstance(adapt(c), CoroutineService)
    c.close()
    assert isinstance(adapt(lambda: None), CallableService)

    class StartStop:
        def start(self) -> None: ...
        def stop(self) -> None: ...

    assert isinstance(adapt(StartStop()), StartStopService)
    service = CallableService(lambda: None, name="x")
    assert adapt(service) is service


def test_unknown_server_is_a_type_error_that_lists_what_is_accepted(fresh: Lifecycle) -> None:
    with pytest.raises(TypeError, match=r"does not know how to run builtins\.int"):
        graceful.run(42)
    with pytest.raises(ValueError, match="at least one server"):
        graceful.run([])


@pytest.mark.timeout(30)
def test_off_the_main_thread_signals_need_opting_out(fresh: Lifecycle) -> None:
    errors: list[BaseException] = []
    codes: list[int] = []

    def body() -> None:
        try:
            graceful.run(lambda: None)
        except RuntimeError as exc:
            errors.append(exc)
        codes.append(graceful.run(lambda: None, handle_signals=False))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(BOUND)
    assert "main thread" in str(errors[0])
    assert "handle_signals=False" in str(errors[0])
    assert codes == [0]


@pytest.mark.timeout(30)
def test_force_quit_argument_sets_the_budget(fresh: Lifecycle) -> None:
    assert graceful.run(lambda: None, force_quit=3) == 0
    assert fresh.status().force_quit == 3
    with pytest.raises(ValueError, match="greater than 0"):
        graceful.run(lambda: None, force_quit=0)


@pytest.mark.timeout(30)
def test_run_and_signal_handlers_take_any_lifecycle(exits: Recorder) -> None:
    """run(lifecycle=) and signal_handlers(lifecycle=) work on a lifecycle that is not the default."""
    mine = Lifecycle(force_quit=BOUND, exit=exits)
    ran: list[str] = []
    mine.add_shutdown_listener(lambda: ran.append("closed"))
    assert graceful.run(lambda: ran.append("served"), lifecycle=mine) == 0
    assert ran == ["served", "closed"]
    assert graceful.get_lifecycle() is not mine
    other = Lifecycle(force_quit=BOUND, exit=exits)
    with graceful.signal_handlers(lifecycle=other) as router:
        assert router.lifecycle is other


@pytest.mark.timeout(30)
def test_a_failure_while_starting_runs_the_sequence_then_raises(
    fresh: Lifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graceful import _run

    closed = threading.Event()
    fresh.add_shutdown_listener(closed.set)

    def broken_start(self: object, service: object, ctx: object) -> None:
        raise OSError("cannot start a thread")

    monkeypatch.setattr(_run._Runner, "_start_thread", broken_start)
    with pytest.raises(OSError, match="cannot start a thread"):
        graceful.run(lambda: None)
    assert closed.is_set()
    assert fresh.exit_code == 1
    assert fresh.state() is State.STOPPED


@pytest.mark.timeout(30)
def test_ctrl_c_while_starting_is_a_graceful_shutdown_and_skips_unstarted_servers(
    fresh: Lifecycle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from graceful import _run

    wrapped: list[str] = []

    class Server:
        name = "never-served"

        def serve(self, ctx: graceful.Context) -> None:
            raise AssertionError("not reached")

        def wrap_up(self, ctx: graceful.Context) -> None:
            wrapped.append("wrap_up")

        def close(self, ctx: graceful.Context) -> None:
            wrapped.append("close")

    def interrupted(self: object, service: object, ctx: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_run._Runner, "_start_thread", interrupted)
    with caplog.at_level(logging.INFO, logger="graceful"):
        assert graceful.run(Server()) == 0
    assert wrapped == ["close"]
    assert "never started serving" in caplog.text


def test_run_refuses_a_lifecycle_that_has_already_stopped(lc: Lifecycle) -> None:
    lc.shutdown("done before run")
    with pytest.raises(RuntimeError, match="already stopped"):
        graceful.run(lambda: None, handle_signals=False, lifecycle=lc)
