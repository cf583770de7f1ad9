"""3. Phase fan-out (10,000 no-op listeners; 100 listeners that each block 1 s; peak RSS) and
6. the cost of ``is_stopping()`` next to ``threading.Event.is_set()``.

Each scenario runs in a fresh process. "run" is the time from the trigger to the moment every
listener has finished (for graceful: ``Lifecycle.shutdown()`` from RUNNING to STOPPED, both
phases); "register" is the time to register them. Peak RSS is the process's high-water mark
(``VmHWM``) and, in brackets, how far it rose above the resident size measured just
before the listeners were created.

The peers' nearest equivalents: aiomisc's ``Signal`` (the entrypoint's ``pre_stop`` /
``post_stop`` receivers) and cotyledon's ``on_terminate`` hooks. Both call their receivers one
after another, so the blocking case is measured with 10 x 0.1 s (what 100 x 1 s would take is
then 100 times that) rather than spending minutes on it. uvicorn and grpcio have no listener
registry: the figure does not apply to them.
"""

from __future__ import annotations

from _harness import BenchError, Row, Setup, log, median, ms, run_json

PRELUDE = """
import json, sys, time
N, SLEEP = int(sys.argv[1]), float(sys.argv[2])

def rss_kib(field="VmRSS:"):
    # /proc, not ru_maxrss: Linux carries ru_maxrss over exec(), so a child would report its
    # parent's peak whenever that is larger.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:  # no /proc: not Linux
        pass
    return 0

def report(register, run):
    peak = rss_kib("VmHWM:")
    print(json.dumps({"register_s": register, "run_s": run, "peak_kib": peak, "start_kib": START}))
"""

SYNC_FNS = """
def make():
    if SLEEP:
        return lambda: time.sleep(SLEEP)
    return lambda: None
"""

ASYNC_FNS = """
import asyncio

def make():
    async def receiver(*args, **kwargs):
        if SLEEP:
            await asyncio.sleep(SLEEP)
    return receiver
"""

GRACEFUL = (
    PRELUDE
    + SYNC_FNS
    + """
import graceful
START = rss_kib()
lc = graceful.Lifecycle(force_quit=600)
fns = [make() for _ in range(N)]
t0 = time.perf_counter()
for fn in fns:
    lc.add_wrap_up_listener(fn)
t1 = time.perf_counter()
lc.shutdown("benchmark")
t2 = time.perf_counter()
report(t1 - t0, t2 - t1)
"""
)

BARE_THREADS = (
    PRELUDE
    + SYNC_FNS
    + """
import threading
START = rss_kib()
fns = [make() for _ in range(N)]
t0 = time.perf_counter()
threads = [threading.Thread(target=fn) for fn in fns]
t1 = time.perf_counter()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
t2 = time.perf_counter()
report(t1 - t0, t2 - t1)
"""
)

BARE_LOOP = (
    PRELUDE
    + SYNC_FNS
    + """
START = rss_kib()
fns = [make() for _ in range(N)]
t1 = time.perf_counter()
for fn in fns:
    fn()
t2 = time.perf_counter()
report(0.0, t2 - t1)
"""
)

AIOMISC = (
    PRELUDE
    + ASYNC_FNS
    + """
import aiomisc
START = rss_kib()
signal = aiomisc.Signal()
fns = [make() for _ in range(N)]
t0 = time.perf_counter()
for fn in fns:
    signal.connect(fn)
t1 = time.perf_counter()

async def main():
    start = time.perf_counter()
    await signal.call(entrypoint=None)
    return time.perf_counter() - start

report(t1 - t0, asyncio.run(main()))
"""
)

COTYLEDON = (
    PRELUDE
    + SYNC_FNS
    + """
import cotyledon
START = rss_kib()
manager = cotyledon.ServiceManager()
fns = [make() for _ in range(N)]
t0 = time.perf_counter()
for fn in fns:
    manager.register_hooks(on_terminate=fn)
t1 = time.perf_counter()
manager._run_hooks("terminate")  # what its SIGTERM path runs
t2 = time.perf_counter()
report(t1 - t0, t2 - t1)
"""
)

IS_STOPPING = """
import json, sys, threading, timeit
import graceful

NUMBER, REPEAT = int(sys.argv[1]), int(sys.argv[2])
lc = graceful.Lifecycle()
event = threading.Event()
stopping = False
namespace = {"graceful": graceful, "lc": lc, "event": event, "stopping": stopping}
statements = ["graceful.is_stopping()", "lc.is_stopping()", "event.is_set()", "stopping"]
samples = {s: [] for s in statements}
for _ in range(REPEAT):
    for statement in statements:  # interleaved: the machine's noise falls on all of them
        took = timeit.Timer(statement, globals=namespace).timeit(NUMBER)
        samples[statement].append(took / NUMBER)
print(json.dumps(samples))
"""

# (contender, program, the peer module it needs, runs the blocking case with 10 x 0.1 s)
_FANOUT = [
    ("graceful Lifecycle", GRACEFUL, "", False),
    ("bare Python: one thread per listener", BARE_THREADS, "", False),
    ("bare Python: plain loop (no concurrency)", BARE_LOOP, "", False),
    ("aiomisc Signal (pre_stop/post_stop)", AIOMISC, "aiomisc", True),
    ("cotyledon on_terminate hooks", COTYLEDON, "cotyledon", True),
]

NOOP = 10_000
BLOCKERS, BLOCK = 100, 1.0
QUICK_NOOP, QUICK_BLOCK = 2_000, 0.2  # --quick: same code paths, smaller sizes, no verdict
SEQUENTIAL_BLOCKERS, SEQUENTIAL_BLOCK = 10, 0.1


def _series(setup: Setup, code: str, n: int, sleep: float, runs: int) -> list[dict[str, float]]:
    out = []
    for _ in range(runs):
        sample = run_json(setup.python, code, args=(str(n), repr(sleep)), bound=120 + n * sleep)
        out.append({key: float(value) for key, value in sample.items()})  # type: ignore[arg-type]
    return out


def _summary(samples: list[dict[str, float]]) -> tuple[float, str]:
    run = median([s["run_s"] for s in samples])
    register = median([s["register_s"] for s in samples])
    peak = median([s["peak_kib"] for s in samples]) / 1024
    grew = median([s["peak_kib"] - s["start_kib"] for s in samples]) / 1024
    text = f"run {ms(run)}"
    if register:
        text += f", register {ms(register)}"
    return run, f"{text}; peak RSS {peak:.1f} MiB ({grew:+.1f})"


def run(setup: Setup, runs: int) -> list[Row]:
    rows: list[Row] = []
    noop, block = (QUICK_NOOP, QUICK_BLOCK) if setup.quick else (NOOP, BLOCK)
    noop_runs = 1 if setup.quick else max(1, min(runs, 5))
    block_runs = 1 if setup.quick else 3
    for contender, code, module, sequential in _FANOUT:
        if module and not setup.has(module):
            skipped = (
                "skipped: --quick runs only graceful and the bare baseline" if setup.quick else "skipped"
            )
            rows.append(Row("3. fan-out", contender, skipped))
            continue
        try:
            noop_samples = _series(setup, code, noop, 0.0, noop_runs)
            if contender.startswith("bare Python: plain loop"):
                blocking: list[dict[str, float]] = []
            elif sequential:
                blocking = _series(setup, code, SEQUENTIAL_BLOCKERS, SEQUENTIAL_BLOCK, block_runs)
            else:
                blocking = _series(setup, code, BLOCKERS, block, block_runs)
        except BenchError as exc:
            rows.append(Row("3. fan-out", contender, f"failed: {exc}"))
            continue
        rows.append(_noop_row(contender, noop_samples, noop, setup.quick))
        if blocking:
            rows.append(_blocking_row(contender, blocking, sequential, block, setup.quick))
        log(f"fan-out: {contender} done")
    return rows


def _noop_row(contender: str, samples: list[dict[str, float]], n: int, quick: bool) -> Row:
    run, text = _summary(samples)
    goal = ""
    if contender == "graceful Lifecycle" and not quick:
        goal = f"{'met' if run < 0.1 else 'MISSED'}: < 100 ms ({ms(run)})"
    bench = f"3. fan-out: {n:,} no-op listeners"
    return Row(bench, contender, f"{text} (n={len(samples)})", "", goal, {"samples": samples})


def _blocking_row(
    contender: str, samples: list[dict[str, float]], sequential: bool, block: float, quick: bool
) -> Row:
    run, text = _summary(samples)
    if sequential:
        text = (
            f"{SEQUENTIAL_BLOCKERS} x {SEQUENTIAL_BLOCK:g} s: {text}: one after another, "
            f"so 100 x 1 s takes ~{run * BLOCKERS * BLOCK / (SEQUENTIAL_BLOCKERS * SEQUENTIAL_BLOCK):.0f} s"
        )
    goal = ""
    if contender == "graceful Lifecycle" and not quick:
        goal = f"{'met' if run < 1.3 else 'MISSED'}: < 1.3 s ({run:.3f} s)"
    bench = f"3. fan-out: {BLOCKERS} listeners x {block:g} s"
    return Row(bench, contender, f"{text} (n={len(samples)})", "", goal, {"samples": samples})


def run_is_stopping(setup: Setup, runs: int) -> list[Row]:
    return [_is_stopping(setup, runs)]


def _is_stopping(setup: Setup, runs: int) -> Row:
    number, repeat = (200_000, 3) if setup.quick else (2_000_000, max(5, min(runs, 9)))
    try:
        samples = run_json(setup.python, IS_STOPPING, args=(str(number), str(repeat)))
    except BenchError as exc:
        return Row("6. is_stopping() per call", "graceful", f"failed: {exc}")
    per_call = {statement: median(values) for statement, values in samples.items()}  # type: ignore[arg-type]
    mine, event = per_call["graceful.is_stopping()"], per_call["event.is_set()"]
    result = "; ".join(f"`{statement}` {value * 1e9:.1f} ns" for statement, value in per_call.items())
    goal = f"{'met' if mine <= event else 'MISSED'}: <= Event.is_set() ({mine / event:.2f}x)"
    return Row(
        "6. is_stopping() per call",
        "graceful vs threading.Event",
        f"{result} (median of {repeat} x {number:,} calls)",
        f"{mine / event:.2f}x Event.is_set()",
        goal,
        {"per_call_s": samples},
    )
