"""2. SIGTERM -> process exit for an idle service.

The clock starts when the parent sends SIGTERM and stops when the parent sees the exit (a
pidfd turns readable), so it covers everything a supervisor waits for: signal delivery, the
tool's hand-off from its handler, its shutdown sequence, interpreter teardown. Each child idles
``SETTLE`` seconds after it said it was ready, so it is truly idle (its main thread blocked)
when the signal comes. The contenders take turns, run after run, so the machine's noise is
spread over all of them.
"""

from __future__ import annotations

import signal
import time

from _harness import BenchError, Child, Row, Setup, codes_text, log, median, ms, p90, ratio
from _programs import IDLE, Program, note, unavailable

SETTLE = 0.1
EXIT_BOUND = 5.0  # s; the slowest idle contender exits in ~0.5 s
GOAL_RATIO = 1.2
PEERS = ("aiomisc", "cotyledon", "uvicorn", "grpcio")


class _Series:
    def __init__(self, program: Program) -> None:
        self.program = program
        self.times: list[float] = []
        self.codes: list[int | None] = []
        self.hangs = 0
        self.problem = ""


def _measure_once(setup: Setup, series: _Series, settle: float) -> None:
    program = series.program
    try:
        with Child(setup.python, program.code(), notify=program.notify) as child:
            child.wait_ready()
            time.sleep(settle)
            took = child.time_signal(signal.SIGTERM, EXIT_BOUND)
            if took is None:  # counted, and measured again next run: a hang may be a race
                series.hangs += 1
                return
            series.codes.append(child.returncode)
            series.times.append(took)
    except BenchError as exc:
        series.problem = f"failed: {exc}"


def run(setup: Setup, runs: int) -> list[Row]:
    settle = SETTLE / 2 if setup.quick else SETTLE
    all_series = [_Series(program) for program in IDLE]
    runnable = [s for s in all_series if not unavailable(s.program, setup)]
    for i in range(runs):
        for series in runnable:
            if not series.problem:
                _measure_once(setup, series, settle)
        if i in (0, runs // 2):
            log(f"sigterm: run {i + 1} of {runs} done")
    return _rows(setup, all_series, runs)


def _rows(setup: Setup, all_series: list[_Series], runs: int) -> list[Row]:
    medians = {s.program.contender: median(s.times) for s in all_series if s.times and not s.problem}
    bare = next((m for name, m in medians.items() if name.startswith("bare Python")), 0.0)
    rows = []
    for series in all_series:
        program = series.program
        reason = unavailable(program, setup)
        if reason or series.problem or not series.times:
            rows.append(
                Row("2. SIGTERM -> exit (idle)", program.contender, reason or series.problem or "no data")
            )
            continue
        times = series.times
        result = (
            f"median {ms(median(times))}, p90 {ms(p90(times))}, max {ms(max(times))} "
            f"(n={len(times)}); exit {codes_text(series.codes)}"
        )
        if series.hangs:
            result += f"; HUNG in {series.hangs} of {series.hangs + len(times)} runs (killed after {EXIT_BOUND:g} s)"
        extra = note(program, setup)
        if extra:
            result += f"; {extra}"
        goal = _goal(program.contender, medians, bare) if program.contender == "graceful.run(service)" else ""
        rows.append(
            Row(
                "2. SIGTERM -> exit (idle)",
                program.contender,
                result,
                f"{ratio(median(times), bare)} bare" if bare else "",
                goal,
                {"times_s": times, "codes": series.codes, "hangs": series.hangs},
            )
        )
    return rows


def _goal(name: str, medians: dict[str, float], bare: float) -> str:
    mine = medians[name]
    peers = {other: value for other, value in medians.items() if other.split()[0] in PEERS}
    slower_than = [other for other, value in peers.items() if value <= mine]
    within = bare > 0 and mine <= GOAL_RATIO * bare
    met = within and not slower_than
    text = f"<= {GOAL_RATIO}x bare ({mine / bare:.2f}x)" if bare else "bare baseline missing"
    if peers:
        text += (
            ", faster than every peer" if not slower_than else f", NOT faster than {', '.join(slower_than)}"
        )
    else:
        text += " (no peer measured)"
    return f"{'met' if met else 'MISSED'}: {text}"
