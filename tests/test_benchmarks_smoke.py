"""``python benchmarks/run.py --quick`` still runs and prints its table, so the benchmarks never rot.

The full benchmark run is not part of the test command: it takes minutes and installs the peers
from PyPI into ``benchmarks/.peers``. Its smoke mode is: graceful and the bare baseline only,
few iterations, no virtual environment, no network. Only the shape of the output is checked
here, never a timing (the numbers belong to docs/performance.md, measured on a quiet run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

BOUND = 30.0  # seconds for the whole smoke run (it takes ~10-15 s on the loaded 2-core box)
SECTIONS = (
    "1. import",
    "2. SIGTERM -> exit (idle)",
    "3. fan-out",
    "4. drain under load",
    "5. force quit",
    "6. is_stopping()",
    "7. long-lived",
    "9. serving cost",
    "12. probe port soak",
)
MEASURED = (  # (section, contender, a word its measured result must contain)
    ("1. import", "graceful", "own modules"),
    ("2. SIGTERM", "bare Python (signal.signal + sys.exit)", "exit 0"),
    ("2. SIGTERM", "graceful.run(service)", "exit 0"),
    ("2. SIGTERM", "graceful.run(ThreadingHTTPServer)", "exit 0"),
    ("3. fan-out", "graceful Lifecycle", "peak RSS"),
    ("4. drain", "graceful.run(ThreadingHTTPServer)", "accepted"),
    ("5. force quit", "bare Python (threading.Timer + os._exit)", "exit 70"),
    ("5. force quit", "graceful.run(service) + stuck listener", "exit 70"),
    ("6. is_stopping()", "graceful vs threading.Event", "ns"),
    ("7. long-lived", "graceful.run(uvicorn.Server)", "close frame 1001"),
    ("7. long-lived", "graceful.run(AiohttpService)", "close frame 1001"),
    ("12. probe port soak", "graceful ProbeServer (one selector thread)", "/readyz median"),
    (
        "12. probe port soak",
        "thread per connection (ThreadingHTTPServer; graceful before #27)",
        "/readyz median",
    ),
)


def _table(stdout: str) -> tuple[str, list[list[str]]]:
    """(the rule line under the header, every other row split into its cells)."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    rule = lines.pop(1)
    return rule, [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


@pytest.mark.timeout(BOUND + 30)
def test_quick_run_prints_one_table_with_every_section() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("COVERAGE_")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BOUND,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rule, table = _table(result.stdout)
    assert table[0] == ["benchmark", "contender", "result", "vs", "goal"]
    assert re.fullmatch(r"\|(-+\|){5}", rule), rule  # Markdown: pastes into docs/performance.md
    body = table[1:]
    assert all(len(row) == 5 for row in body), "a cell leaked a '|' and broke the table"
    for name in SECTIONS:
        assert any(row[0].startswith(name) for row in body), f"section {name!r} missing"

    for row in body:
        assert not row[2].startswith(("failed", "no exit", "not run")), row
    for section, contender, word in MEASURED:
        rows = [row for row in body if row[0].startswith(section) and row[1] == contender]
        assert rows, f"no row for {contender!r} in {section!r}"
        assert all(word in row[2] for row in rows), rows
    serving = [row for row in body if row[0].startswith("9. serving") and row[1].startswith("stdlib")]
    if shutil.which("wrk") is None:  # the serving section needs wrk: it says it skipped
        assert all(row[2].startswith("skipped: wrk") for row in serving), serving
    else:
        assert serving, "no serving row for the stdlib server"
        assert all("req/s" in row[2] and "p99" in row[2] for row in serving), serving
    # --quick never touches the network nor the peers: every peer row says it was skipped
    for row in body:
        if row[1].split()[0] in ("aiomisc", "cotyledon", "uvicorn", "grpcio"):
            assert row[2].startswith("skipped"), row


CHAOS_BOUND = 20.0  # seconds for the chaos section's smallest run (~5-8 s on the loaded 2-core box)


@pytest.mark.timeout(CHAOS_BOUND + 30)
def test_chaos_quick_run_counts_every_job_of_graceful_worker() -> None:
    """The chaos rig (a real Redis, real SIGTERMs, restarts) runs, and graceful's Worker loses nothing."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COVERAGE_")}
    command = [
        "--only",
        "chaos",
        "--quick",
        "--contenders",
        "graceful Worker",
        "--jobs",
        "20",
        "--stops",
        "2",
    ]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CHAOS_BOUND,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _, table = _table(result.stdout.split("\n\nChaos:")[0])
    rows = [row for row in table[1:] if row[0] == "10. chaos"]
    assert [row[1] for row in rows] == [
        "graceful Worker (Redis list), budget 3 s",
        "graceful Worker (Redis list), budget 0.2 s",
    ]
    for row in rows:
        assert "2 stops over 1 seed of 20 jobs" in row[2], row
        assert "lost 0," in row[2], row
        assert "children left 0" in row[2], row
    assert "| row " in result.stdout.split("\n\nChaos:")[1], "the chaos table is missing"


INPLACE_BOUND = 40.0  # seconds for the in-place rig's smoke (~10 s on the loaded 2-core box)
INPLACE_ROW = re.compile(
    r"failed \d+ in 2 (restarts|upgrades) \(refused \d+, reset \d+, other \d+, non-2xx \d+\); "
    r"p50/p99 \d+/\d+ ms vs steady \d+/\d+ ms \(p99 x\d+\.\d\); signal -> old gone \d+\.\d\d/\d+\.\d\d s, "
    r"-> new serving \d+\.\d\d/\d+\.\d\d s \(median/max\); old exit .*; tracebacks \d+; \d+ req at \d+/s"
)


@pytest.mark.skipif(shutil.which("hey") is None, reason="hey not installed (apt-get install hey)")
@pytest.mark.timeout(INPLACE_BOUND + 30)
def test_inplace_rig_measures_restarts_and_leaves_no_process(tmp_path: Path) -> None:
    """``--only inplace --quick``: the in-place restarts are measured, graceful's upgrade rows are
    measured or say why not, and no process of the run outlives it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COVERAGE_")}
    env["TMPDIR"] = str(tmp_path)  # the rig's processes all run in a directory under it
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            *("--only", "inplace", "--quick", "--restarts", "2", "--contenders", "restarted,SIGUSR2"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=INPLACE_BOUND,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, table = _table(result.stdout)
    rows = {row[1]: row[2] for row in table if row[0] == "11. in-place"}
    assert "graceful.run(ThreadingHTTPServer), restarted in place" in rows, rows
    for name, text in rows.items():
        if text.startswith("skipped: uvicorn"):  # graceful.listen is here: SIGUSR2 rows are measured
            assert "uvicorn" in name, (name, text)
            continue
        assert INPLACE_ROW.fullmatch(text), (name, text)
    assert not _running_in(tmp_path), "the rig left processes behind"


def _running_in(folder: Path) -> list[str]:
    """The processes whose working directory is under ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(folder)):
            found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
    return found
