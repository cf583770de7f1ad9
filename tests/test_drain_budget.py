"""A drain delay within the force-quit budget (issue #27, item 7).

The delay counts from the first wrap-up trigger and the deadline from the shutdown, one moment
at SIGTERM: a delay that reaches the budget ends every stop in the forced exit, on an idle
server too. The drain (the delay, then the requests in flight) belongs inside the wrap-up
timeout (25 s of budget: 20 s; the rest is the shutdown listeners'), so the delay must end 1 s
before it (half the wrap-up timeout when that is 2 s or less). At start, a fixed delay that
does not is a WARNING with the numbers and what to change (kept: it is the operator's number);
``auto``'s maximum is cut to fit, said at INFO. Each case at start is a real service in a
child under ``graceful.run``; tests/test_host_gunicorn_budget.py has the same under a real
gunicorn arbiter.
"""

from __future__ import annotations

import logging
import signal

import pytest

from graceful import Lifecycle, readiness
from graceful.testing import ProcessFactory

from .conftest import BOUND, Recorder
from .support.web import free_port
from .test_readiness import SERVICE

FORCED = 70


def fitted(setting: float | str, budget: float) -> tuple[str | None, float, bool]:
    lc = Lifecycle(force_quit=budget, exit=Recorder())
    readiness.set_drain_delay(setting, lc)
    said = readiness.fit_drain_delay(lc)
    return said, readiness.drain_delay(lc), readiness.drain_delay_is_auto(lc)


@pytest.mark.parametrize(
    ("setting", "budget", "most", "then"),
    [
        (5, 3, 1.4, "forced"),  # the cases: wrap-up timeout 2.4 s
        (3, 3, 1.4, "forced"),
        (2, 3, 1.4, "share the 1 s left"),
        (1.4, 3, 1.4, None),  # fits
        (19, 25, 19, None),  # the default budget: wrap-up timeout 20 s
        (19.5, 25, 19, "share the 5.5 s left"),
        (24, 25, 19, "share the 1 s left"),
        (0.6, 1, 0.4, "forced"),  # a wrap-up timeout of 2 s or less keeps half of it
    ],
)
def test_a_fixed_delay_is_kept_and_warned_about_when_it_leaves_no_room(
    setting: float, budget: float, most: float, then: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    said, seconds, auto = fitted(setting, budget)
    assert (seconds, auto) == (setting, False)  # kept
    if then is None:
        assert said is None
        assert not caplog.records
        return
    assert said is not None
    wrap_up = budget - min(5, budget / 5)
    assert said.startswith(
        f"the drain delay ({setting:g} s) leaves the drain no room in the force-quit budget "
        f"({budget:g} s, wrap-up timeout {wrap_up:g} s): "
    )
    assert ("graceful's forced exit (70)" if then == "forced" else then) in said
    assert f"Set GRACEFUL_DRAIN_DELAY to at most {most:g} s, or give the drain more time" in said
    assert [r.levelname for r in caplog.records] == ["WARNING"]


@pytest.mark.parametrize(
    ("setting", "budget", "bound"),
    [("auto", 25, 10), ("auto", 9, 6.2), ("auto:60", 10, 7), ("auto", 3, 1.4), ("auto:5", 1, 0.4)],
)
def test_autos_maximum_is_cut_to_end_before_the_wrap_up_timeout(
    setting: str, budget: float, bound: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "graceful")
    said, seconds, auto = fitted(setting, budget)
    assert (seconds, auto) == (pytest.approx(bound), True)
    if said is None:
        assert not caplog.records
        return
    assert said.startswith(f"drain delay {setting if ':' in setting else 'auto:10'}: at most {bound:g} s")
    assert f"of the {budget:g} s force-quit budget" in said
    assert [r.levelname for r in caplog.records] == ["INFO"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delay", ["5", "3"])
def test_run_warns_at_start_of_a_fixed_delay_at_or_above_the_budget(
    graceful_process: ProcessFactory, delay: str
) -> None:
    """The issue's case: a fixed 5 s (or 3 s) delay, a 3 s budget. The WARNING is said once, at
    start, with both numbers; the stop it foretold is the forced exit it said."""
    child = graceful_process(SERVICE, env={"GRACEFUL_DRAIN_DELAY": delay, "GRACEFUL_FORCE_QUIT": "3"})
    child.wait_for_output("server(s) started: ready", stream="stderr")
    line = (
        f"WARNING graceful the drain delay ({delay} s) leaves the drain no room in the force-quit budget (3 s"
    )
    assert child.stderr.count(line) == 1, child.stderr
    assert child.stderr.index(line) < child.stderr.index("server(s) started")
    child.send_signal(signal.SIGTERM)
    assert child.wait(BOUND).returncode == FORCED


@pytest.mark.timeout(60)
def test_run_with_auto_and_probes_nobody_asks_ends_the_delay_in_time(
    graceful_process: ProcessFactory,
) -> None:
    """auto (at most 10 s), a 3 s budget, a probe port nobody probes: the delay ends at 1.4 s and
    the stop is graceful (exit 0). It used to run into the deadline: exit 70."""
    env = {
        "GRACEFUL_DRAIN_DELAY": "auto",
        "GRACEFUL_FORCE_QUIT": "3",
        "GRACEFUL_PROBE_PORT": str(free_port()),
        "GRACEFUL_PROBE_HOST": "127.0.0.1",
    }
    child = graceful_process(SERVICE, env=env)
    child.wait_for_output("server(s) started: ready", stream="stderr")
    child.send_signal(signal.SIGTERM)
    result = child.wait(BOUND)
    assert result.returncode == 0, result.stderr
    assert (
        "INFO graceful drain delay auto:10: at most 1.4 s, to end 1 s before the wrap-up timeout"
        in result.stderr
    )
    assert "drain delay over after" in result.stderr
    assert "(at its maximum of auto:1.4)" in result.stderr
    assert "WARNING" not in result.stderr
