"""Issue #15: a service learns of its own wrap-up turn, so a worker fed by an API loses no job."""

from __future__ import annotations

import json
import re
import signal
import threading
import urllib.error
import urllib.request

import pytest

import graceful
from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT

DEMO = f"import runpy; runpy.run_path({str(ROOT / 'examples' / 'demo.py')!r}, run_name='__main__')"


def _post(url: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=BOUND) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.timeout(60)
def test_demo_does_every_job_it_accepted_during_the_drain_delay(graceful_process: ProcessFactory) -> None:
    """Demo, drain delay 1 s, SIGTERM, two POSTs after: each 202 job is done, exit 0."""
    child = graceful_process(DEMO, env={"PORT": "0", "GRACEFUL_DRAIN_DELAY": "1"})
    try:
        child.wait_for_output("ready", stream="stderr")
        port = re.search(r"serving on http://127.0.0.1:(\d+)", child.stderr)
        assert port is not None
        url = f"http://127.0.0.1:{port.group(1)}/jobs"
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("wrapping up", stream="stderr")
        answers = [_post(url), _post(url)]  # inside the drain delay: still served
        assert child.wait(30).returncode == 0, child.stderr
        accepted = [body["job"] for code, body in answers if code == 202]
        assert accepted, answers  # the delay is 1 s: at least the first one is accepted
        for job in accepted:
            assert f"job {job} done" in child.stderr, child.stderr
        err = child.stderr
        assert err.index("stopped accepting") < err.index("worker: no new jobs taken"), err
        assert "Traceback" not in err
    finally:
        child.kill()


@pytest.mark.timeout(30)
def test_context_turn_comes_after_the_services_listed_later(fresh: graceful.Lifecycle) -> None:
    """run([a, b]): a's ctx.wrapping_up() is still False while b wraps up, True after."""
    seen: list[tuple[str, bool]] = []
    ctx_of: dict[str, graceful.Context] = {}
    b_wrapping = threading.Event()
    b_serving = threading.Event()

    def a(ctx: graceful.Context) -> None:
        ctx_of["a"] = ctx
        assert b_serving.wait(BOUND)
        ctx.lifecycle.shutdown("test", wait=False)  # both serve: both must be wrapped up
        assert ctx.wait_for_wrap_up(BOUND)
        seen.append(("a turn", b_wrapping.is_set()))

    class B:
        name = "b"

        def serve(self, ctx: graceful.Context) -> None:
            ctx.started()
            b_serving.set()
            ctx.wait_for_wrap_up(BOUND)

        def wrap_up(self, ctx: graceful.Context) -> None:
            seen.append(("b wraps; a's turn", ctx_of["a"].wrapping_up()))
            b_wrapping.set()

        def close(self, ctx: graceful.Context) -> None:
            return None

    assert graceful.run([a, B()], handle_signals=False) == 0
    assert seen == [("b wraps; a's turn", False), ("a turn", True)]
