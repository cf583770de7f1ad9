"""The README's first command: the demo service stops cleanly with Ctrl-C or kill."""

from __future__ import annotations

import json
import re
import signal
import urllib.request

import pytest

from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT

DEMO = f"import runpy; runpy.run_path({str(ROOT / 'examples' / 'demo.py')!r}, run_name='__main__')"


@pytest.mark.timeout(40)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_serves_then_logs_every_phase_and_exits_0(graceful_process: ProcessFactory, sig: int) -> None:
    child = graceful_process(DEMO, env={"PORT": "0"})
    try:
        child.wait_for_output("ready", stream="stderr")
        port = re.search(r"serving on http://127.0.0.1:(\d+)", child.stderr)
        assert port is not None
        url = f"http://127.0.0.1:{port.group(1)}/"
        with urllib.request.urlopen(url, timeout=BOUND) as response:
            assert json.loads(response.read())["stopping"] is False
        child.send_signal(sig)
        assert child.wait(30).returncode == 0
        for line in (
            "wrapping up",
            "worker: no new jobs taken",
            "shutting down",
            "database connections closed",
            "stopped (",
        ):
            assert line in child.stderr
        assert "Traceback" not in child.stderr
    finally:
        child.kill()
