"""The README's test command starts clean: a failed run's coverage data is not merged into the next.

A real ``coverage run -m pytest`` in a subprocess, on the whole suite as the README runs it (no
test paths), narrowed with ``-k`` to one of its own test files (which starts subprocesses, which
write data files too), with the data files in a folder of the test's own (``COVERAGE_FILE``)
where a failed run has left some behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytest.importorskip("coverage")


def _coverage_run(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Not measured by this run's own coverage: the child is a `coverage run` of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    env |= {"COVERAGE_FILE": str(data / ".coverage"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "coverage", "run", "-m", "pytest", "-p", "no:randomly", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(150)
def test_a_measured_run_erases_the_data_files_a_failed_run_left_behind(tmp_path: Path) -> None:
    """Stale .coverage.* files are gone once the next run starts; that run's own are all there."""
    stale = [tmp_path / f".coverage.old-host.{pid}.123456" for pid in (11, 12, 13)]
    for path in stale:
        path.write_text("left by a failed run")
    (tmp_path / ".coveragerc").write_text("not coverage data")
    done = _coverage_run(tmp_path, "-k", "test_import_graceful")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "coverage: erased 3 data file(s) an earlier run left behind" in done.stdout, done.stdout
    left = sorted(path.name for path in tmp_path.glob(".coverage.*"))
    assert not any(name.startswith(".coverage.old-host") for name in left), left
    assert len(left) >= 2, left  # pytest's own, and the subprocesses' of tests/test_import.py
    assert (tmp_path / ".coveragerc").exists()


@pytest.mark.timeout(150)
def test_a_measured_run_of_some_test_files_leaves_other_runs_data_alone(tmp_path: Path) -> None:
    """`coverage run -m pytest tests/x.py`, twice, then one combine: a way to add runs up."""
    earlier = tmp_path / ".coverage.other-host.11.123456"
    earlier.write_text("an earlier part of the same measurement")
    done = _coverage_run(tmp_path, "tests/test_import.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "coverage: erased" not in done.stdout, done.stdout
    assert earlier.exists()


def test_plain_pytest_leaves_coverage_data_alone(tmp_path: Path) -> None:
    """Not measured, nothing erased: only a `coverage run` knows which files are its own."""
    from .support.stale_coverage import stale_coverage_data

    if sys.modules.get("coverage") is not None and sys.modules["coverage"].Coverage.current():
        pytest.skip("this session is measured by coverage: the unmeasured case is the subprocess test")
    assert stale_coverage_data() == []
