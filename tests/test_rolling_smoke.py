"""The rolling-restart rig's quick mode runs and prints its rows (skipped without haproxy or hey).

``python benchmarks/run.py --only rolling --quick`` starts a real HAProxy, ``hey`` and two
instances of each quick contender, and restarts them; here with 2 restarts. Only the shape of
the output is checked, never a figure: the numbers belong to docs/performance.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

BOUND = 75.0  # seconds for the whole quick run (~15-25 s on the loaded 2-core box)
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
MISSING = [name for name in ("haproxy", "hey") if not shutil.which(name, path=SBIN)]
ROW = re.compile(
    r"failed \d+ in 2 restarts \(per restart \d+,\d+.*\); HAProxy 5xx \d+.*"
    r"median/max: down .*, exit .*, back \d+\.\d\d/\d+\.\d\d s; exit .*; tracebacks \d+; \d+ req at \d+/s"
)


@pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not installed (apt-get install haproxy hey)"
)
@pytest.mark.timeout(BOUND + 30)
def test_quick_rolling_run_measures_every_quick_contender(tmp_path: Path) -> None:
    """The quick mode exits 0, prints one measured row per quick contender and leaves no process."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COVERAGE_")}
    env["TMPDIR"] = str(tmp_path)  # the rig's processes all run in a directory under it
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--only",
            "rolling",
            "--quick",
            "--restarts",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BOUND,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        [cell.strip() for cell in line.strip("|").split(" | ")]
        for line in result.stdout.splitlines()
        if line.startswith("| 8. rolling")
    ]
    assert all(row[0] == "8. rolling restarts (keep-alive on, retries 0)" for row in rows), rows
    names = [row[1] for row in rows]
    assert any(name.startswith("graceful.run(ThreadingHTTPServer)") for name in names), names
    assert "stdlib ThreadingHTTPServer (hand-written SIGTERM handler)" in names, names
    for row in rows:
        if row[2].startswith("skipped: uvicorn"):
            continue  # an interpreter without uvicorn: that contender says so
        assert ROW.fullmatch(row[2]), row
    assert not _running_in(tmp_path), "the rig left processes behind"


def _running_in(folder: Path) -> list[str]:
    """The processes whose working directory is under ``folder`` (the rig starts all of its there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(folder)):
            found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
    return found


@pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not installed (apt-get install haproxy hey)"
)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.timeout(BOUND)
def test_interrupted_rig_leaves_no_process(tmp_path: Path, signum: int) -> None:
    """Ctrl-C (SIGINT) or SIGTERM to the rig mid-run kills HAProxy, hey and every instance."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COVERAGE_")}
    env["TMPDIR"] = str(tmp_path)
    # As from a terminal: a suite started in the background by a shell without job control
    # passes SIGINT down ignored, and Python keeps it ignored (the rig would never see Ctrl-C).
    launch = "import os, runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    launch += "sys.argv = sys.argv[1:]; sys.path[0] = os.path.dirname(sys.argv[0]); "
    launch += "runpy.run_path(sys.argv[0], run_name='__main__')"
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, str(ROOT / "benchmarks" / "run.py"), "--only", "rolling", "--quick"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while len(_running_in(tmp_path)) < 4:  # two instances, HAProxy and hey: the load is on
            assert proc.poll() is None, "the rig exited before it put load on"
            assert time.monotonic() < deadline, "the rig never put load on"
            time.sleep(0.05)  # polling /proc: there is nothing to wait on
        proc.send_signal(signum)
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert not _running_in(tmp_path), "the rig left processes behind"
