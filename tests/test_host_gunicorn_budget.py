"""graceful.gunicorn: an ``auto`` drain delay fits the budget ``graceful_timeout`` leaves (issue #27, item 7).

The issue's case under a real arbiter: ``auto`` (at most 10 s), a served probe port that nobody
probes, and a ``graceful_timeout`` whose budget (``graceful_timeout - 1``) is shorter than 10 s.
The delay used to take the whole budget and both workers were forced; ``auto`` is now cut, at
each worker's start, to end 1 s before the wrap-up timeout (the budget less a fifth of it).
"""

from __future__ import annotations

import signal

import pytest

from .conftest import BOUND
from .test_host_gunicorn import CONF, WSGI, Start, _free_port, gunicorn

__all__ = ["gunicorn"]  # the fixture, imported for these tests


@pytest.mark.timeout(90)
def test_with_auto_and_probes_nobody_asks_every_worker_stops_gracefully(gunicorn: Start) -> None:
    """graceful_timeout 4: a 3 s budget, a 2.4 s wrap-up timeout, auto cut to 1.4 s; both workers
    stop gracefully, exit 0."""
    env = {
        "GRACEFUL_PROBE_PORT": str(_free_port()),
        "GRACEFUL_PROBE_HOST": "127.0.0.1",
        "GRACEFUL_DRAIN_DELAY": "auto",
    }
    child, _ = gunicorn("-c", CONF, "-w", "2", "--graceful-timeout", "4", WSGI, env=env)
    child.wait_for_line("ready")
    child.wait_for_line("ready")
    child.send_signal(signal.SIGTERM)
    result = child.wait(BOUND)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "2 worker(s) stopped: 2 gracefully, 0 with a failed listener, 0 forced" in err, err
    assert err.count("drain delay auto:10: at most 1.4 s, to end 1 s before the wrap-up timeout") == 2
    # Both reach auto's maximum at the same moment: one may see its sibling's end first.
    ended = err.count("of drain delay: its drain delay is over")
    assert ended >= 1, err
    assert ended + err.count("of drain delay: a sibling worker's auto drain delay ended") == 2, err
