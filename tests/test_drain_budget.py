"""A drain delay within the force-quit budget (issue #27, item 7).

The delay counts from the first wrap-up trigger and the deadline from the shutdown, one moment
at SIGTERM: a delay that reaches the budget ends every stop in the forced exit, on an idle
server too. At start, a fixed delay that leaves the drain less than its room is a WARNING
naming both numbers and what to change (kept: it is the operator's number); ``auto``'s
maximum is cut to the budget less that room, said at INFO. Each case at start is a real
service in a child under ``graceful.run``; tests/test_host_gunicorn_budget.py has the same under a
real gunicorn arbiter.
"""

from __future__ import annotations

import logging
import signal

import pytest

from graceful import Lifecycle, readiness

from .child import Child
from .conftest import Recorder
from .test_readiness import SERVICE
from .web import free_port

FORCED = 70


def fitted(setting: float | str, budget: float) -> tuple[str | None, float, bool]:
    lc = Lifecycle(force_quit=budget, exit=Recorder())
    readiness.set_drain_delay(setting, lc)
    said = readiness.fit_drain_delay(lc)
    return said, readiness.drain_delay(lc), readiness.drain_delay_is_auto(lc)


@pytest.mark.parametrize(
    ("setting", "budget", "expected"),
    [
        (5, 3, 5),  # kept, warned
        (3, 3, 3),
        (2.5, 3, 2.5),
        (2, 3, 2),  # leaves 1 s: fits
        (24, 25, 24),
        (0.6, 1, 0.6),  # a budget of 2 s or less keeps half of it
    ],
)
def test_a_fixed_delay_is_kept_and_warned_about_when_it_leaves_no_room(
    setting: float, budget: float, expected: float, caplog: pytest.LogCaptureFixture
) -> None:
    said, seconds, auto = fitted(setting, budget)
    assert (seconds, auto) == (expected, False)
    room = 1.0 if budget > 2 else budget / 2
    if setting <= budget - room:
        assert said is None
        assert not caplog.records
        return
    assert said is not None
    assert f"the drain delay ({setting:g} s) leaves no room in the force-quit budget ({budget:g} s)" in said
    assert f"GRACEFUL_DRAIN_DELAY to at most {budget - room:g} s" in said
    assert (
        f"GRACEFUL_FORCE_QUIT; under gunicorn, --graceful-timeout) to at least {setting + room:g} s" in said
    )
    assert [r.levelname for r in caplog.records] == ["WARNING"]


@pytest.mark.parametrize(
    ("setting", "budget", "bound"),
    [("auto", 25, 10), ("auto", 9, 8), ("auto:60", 10, 9), ("auto", 3, 2), ("auto:5", 1, 0.5)],
)
def test_autos_maximum_is_cut_to_what_the_budget_leaves(
    setting: str, budget: float, bound: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "graceful")
    said, seconds, auto = fitted(setting, budget)
    assert (seconds, auto) == (bound, True)
    if said is None:
        assert not caplog.records
        return
    assert said.startswith(f"drain delay {setting if ':' in setting else 'auto:10'}: at most {bound:g} s")
    assert f"the force-quit budget ({budget:g} s)" in said
    assert [r.levelname for r in caplog.records] == ["INFO"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delay", ["5", "3"])
def test_run_warns_at_start_of_a_fixed_delay_at_or_above_the_budget(
    children: list[Child], delay: str
) -> None:
    """The issue's case: a fixed 5 s (or 3 s) delay, a 3 s budget. The WARNING is said once, at
    start, with both numbers; the stop it foretold is the forced exit it said."""
    child = Child(SERVICE, env={"GRACEFUL_DRAIN_DELAY": delay, "GRACEFUL_FORCE_QUIT": "3"})
    children.append(child)
    child.expect_err("server(s) started: ready")
    line = f"WARNING graceful the drain delay ({delay} s) leaves no room in the force-quit budget (3 s)"
    assert child.err.count(line) == 1, child.err
    assert child.err.index(line) < child.err.index("server(s) started")
    child.send(signal.SIGTERM)
    assert child.wait() == FORCED


@pytest.mark.timeout(60)
def test_run_with_auto_and_probes_nobody_asks_ends_the_delay_in_time(children: list[Child]) -> None:
    """auto (at most 10 s), a 3 s budget, a probe port nobody probes: the delay ends at 2 s and
    the stop is graceful (exit 0). It used to run into the deadline: exit 70."""
    env = {
        "GRACEFUL_DRAIN_DELAY": "auto",
        "GRACEFUL_FORCE_QUIT": "3",
        "GRACEFUL_PROBE_PORT": str(free_port()),
        "GRACEFUL_PROBE_HOST": "127.0.0.1",
    }
    child = Child(SERVICE, env=env)
    children.append(child)
    child.expect_err("server(s) started: ready")
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.err
    assert "INFO graceful drain delay auto:10: at most 2 s, the force-quit budget (3 s) less 1 s" in child.err
    assert "drain delay over after" in child.err
    assert "(at its maximum of auto:2)" in child.err
    assert "WARNING" not in child.err
