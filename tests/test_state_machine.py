"""A hypothesis state machine over the public API of a Lifecycle.

Random interleavings of register / remove / wrap_up / shutdown / clock advance, some of them
fired from several threads at once, while listeners run (and block) on the pool. Afterwards:
every listener that was not removed ran exactly once (or was abandoned at the wrap-up timeout
before a thread took it up), a removed one never ran, the state only moved forward, no shutdown
listener started before a wrap-up listener registered ahead of the shutdown phase had finished
or was abandoned, and the exit code says what happened.
"""

from __future__ import annotations

import itertools
import threading

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from graceful import Lifecycle, State, Waiter
from graceful._deadline import FakeClock

from .conftest import BOUND, Recorder

ORDER = [State.RUNNING, State.WRAPPING_UP, State.SHUTTING_DOWN, State.STOPPED]


class LifecycleMachine(RuleBasedStateMachine):
    waiters = Bundle("waiters")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.exits = Recorder()
        self.lc = Lifecycle(force_quit=10, clock=self.clock, exit=self.exits)
        self.lock = threading.Lock()
        self.seq = itertools.count()
        self.events: list[tuple[int, str, int, str]] = []  # (seq, kind, id, phase)
        self.must_precede_shutdown: set[int] = set()
        self.gate = threading.Event()
        self.ids = itertools.count()
        self.removed: set[int] = set()
        self.registered: dict[int, str] = {}
        self.waiter_of: dict[int, Waiter] = {}
        self.highest = 0
        self.raising: set[int] = set()

    def _note(self, kind: str, ident: int, phase: str) -> None:
        with self.lock:
            self.events.append((next(self.seq), kind, ident, phase))

    def _listener(self, ident: int, phase: str, block: bool, fail: bool):  # type: ignore[no-untyped-def]
        def fn() -> None:
            self._note("start", ident, phase)
            try:
                if block:
                    self.gate.wait(BOUND)
                if fail:
                    raise RuntimeError(f"listener {ident} fails on purpose")
            finally:
                self._note("end", ident, phase)

        return fn

    @rule(
        target=waiters,
        phase=st.sampled_from(["wrap_up", "shutdown"]),
        block=st.booleans(),
        fail=st.booleans(),
    )
    def register(self, phase: str, block: bool, fail: bool) -> tuple[int, Waiter]:
        ident = next(self.ids)
        fn = self._listener(ident, phase, block, fail)
        add = self.lc.add_wrap_up_listener if phase == "wrap_up" else self.lc.add_shutdown_listener
        waiter = add(fn, name=f"l{ident}")
        self.registered[ident] = phase
        self.waiter_of[ident] = waiter
        if fail:
            self.raising.add(ident)
        if phase == "wrap_up" and self.lc.state() in (State.RUNNING, State.WRAPPING_UP):
            self.must_precede_shutdown.add(ident)
        return ident, waiter

    @rule(item=waiters)
    def remove(self, item: tuple[int, Waiter]) -> None:
        ident, waiter = item
        if waiter.remove():
            self.removed.add(ident)

    @rule(reason=st.text(max_size=5))
    def wrap_up(self, reason: str) -> None:
        self.lc.wrap_up(reason)

    @rule()
    def shutdown(self) -> None:
        self.lc.shutdown("rule", wait=False)

    @rule(threads=st.integers(min_value=2, max_value=6), shutdown=st.booleans())
    def race(self, threads: int, shutdown: bool) -> None:
        start = threading.Barrier(threads, timeout=BOUND)

        def trigger() -> None:
            start.wait()
            if shutdown:
                self.lc.shutdown("race", wait=False)
            else:
                self.lc.wrap_up("race")

        workers = [threading.Thread(target=trigger) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(BOUND)

    @rule()
    def open_gate(self) -> None:
        self.gate.set()

    @rule(seconds=st.sampled_from([0.5, 3, 11]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def state_moves_forward(self) -> None:
        now = ORDER.index(self.lc.state())
        assert now >= self.highest
        self.highest = now
        assert self.lc.is_stopping() == (now > 0)

    def teardown(self) -> None:
        self.gate.set()
        self.lc.shutdown("teardown", wait=False)
        assert self.lc.wait_for_shutdown(BOUND)
        # Listeners registered after STOPPED may still be finishing: wait for each, bounded.
        for waiter in self.waiter_of.values():
            assert waiter.wait(BOUND)
        with self.lock:
            events = list(self.events)
        abandoned = {i for i, w in self.waiter_of.items() if isinstance(w.exception(), TimeoutError)}
        starts = [i for _, kind, i, _ in events if kind == "start"]
        assert len(starts) == len(set(starts)), "a listener ran twice"
        assert set(starts) <= set(self.registered) - self.removed
        assert set(self.registered) - self.removed - set(starts) <= abandoned
        first_shutdown = next(
            (s for s, kind, _, phase in events if kind == "start" and phase == "shutdown"), None
        )
        if first_shutdown is not None:
            ends = {i: s for s, kind, i, _ in events if kind == "end"}
            for ident in self.must_precede_shutdown - self.removed - abandoned:
                assert ends[ident] < first_shutdown, f"wrap-up l{ident} ended after a shutdown listener began"
        failed = bool(self.raising - self.removed) or bool(abandoned)
        if self.exits.codes:
            assert self.exits.codes == [70]
            assert self.lc.exit_code == 70
        else:
            assert self.lc.exit_code == (1 if failed else 0)


LifecycleMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestLifecycleMachine = LifecycleMachine.TestCase
