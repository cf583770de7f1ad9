"""Benchmarks of graceful side by side with the tools users would pick instead; prints one table.

    python benchmarks/run.py            # full run: creates benchmarks/.peers (pip, from PyPI)
    python benchmarks/run.py --quick    # smoke: graceful and the bare baseline, few iterations
    python benchmarks/run.py --only rolling [--quick]   # rolling restarts behind HAProxy (opt-in)
    python benchmarks/run.py --only chaos [--quick]     # queue workers stopped at random (opt-in)
    python benchmarks/run.py --only inplace [--quick]   # replaced in place, no balancer (opt-in)
    python benchmarks/run.py --only hang [--quick]      # hung listeners beside Celery and aiomisc

Every figure of one run is measured on the same machine, with the same interpreter, in the same
minutes: compare the ratios within a run, not the absolute numbers across runs or machines.
What each figure means is in benchmarks/README.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_chaos
import _bench_drain
import _bench_fanout
import _bench_forcequit
import _bench_hang
import _bench_import
import _bench_inplace
import _bench_long_lived
import _bench_probes
import _bench_rolling
import _bench_serving
import _bench_sigterm
from _harness import ROOT, Row, Setup, ensure_peers, log, section

SECTIONS: dict[str, Callable[[Setup, int], list[Row]]] = {
    "import": _bench_import.run,
    "sigterm": _bench_sigterm.run,
    "fanout": _bench_fanout.run,
    "drain": _bench_drain.run,
    "forcequit": _bench_forcequit.run,
    "is_stopping": _bench_fanout.run_is_stopping,
    "long_lived": _bench_long_lived.run,
    "rolling": _bench_rolling.run,
    "serving": _bench_serving.run,
    "chaos": _bench_chaos.run,
    "probes": _bench_probes.run,
    "inplace": _bench_inplace.run,
    "hang": _bench_hang.run,
}
OPT_IN = {
    "rolling",
    "chaos",
    "inplace",
}  # minutes long, need haproxy and hey / a redis-server: only when named
OWN_PEERS = {"chaos"}  # installs its peers in environments of its own: no benchmarks/.peers needed


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: graceful and bare only, few runs")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 30, --quick 3)")
    parser.add_argument(
        "--import-before",
        default="",
        help="import: also measure graceful from this checkout (before a change)",
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(SECTIONS), help="run only this section (repeatable)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write every sample here (default benchmarks/results/)"
    )
    parser.add_argument(
        "--drain-delays",
        default=None,
        help="rolling: GRACEFUL_DRAIN_DELAY settings of the graceful contenders, comma-separated (default 1,auto)",
    )
    parser.add_argument(
        "--graceful-from",
        default="",
        help="rolling, inplace: run the contenders with graceful from this checkout (default: this one)",
    )
    parser.add_argument(
        "--contenders",
        default=None,
        help="rolling, chaos, inplace: run only the contenders (rows) whose name contains one of these, "
        "comma-separated (case-insensitive; with --quick they run even if the quick mode would skip them)",
    )
    parser.add_argument(
        "--restarts",
        type=int,
        default=None,
        help="rolling, inplace: restarts (upgrades) per run (rolling 6, inplace 20; --quick 3)",
    )
    parser.add_argument(
        "--method",
        choices=("GET", "POST"),
        default="GET",
        help="inplace: hey's HTTP method (POST: hey's client replays no request that failed on a reused connection)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="chaos: jobs per seed (default 500, --quick 20)"
    )
    parser.add_argument(
        "--stops", type=int, default=None, help="chaos: stops per seed (default 12, --quick 3)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="chaos: seeds per row (default 2, --quick 1)")
    parser.add_argument("--parallel", type=int, default=None, help="chaos: runs side by side (default 4)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="serving: alone/graceful rounds (default 5, --quick 1)"
    )
    return parser.parse_args(argv)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine(setup: Setup) -> list[str]:
    peers = ", ".join(f"{name} {version}" for name, version in setup.peers.items()) or "none (--quick)"
    load = " ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        (
            f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), {platform.system()} {platform.release()}, "
            f"load average {load}"
        ),
        f"python: {platform.python_implementation()} {platform.python_version()} ({setup.python})",
        f"peers: {peers}",
        f"graceful: from {ROOT}",
    ]


def format_table(rows: list[Row]) -> str:
    header = ("benchmark", "contender", "result", "vs", "goal")
    cells = [
        header,
        *(tuple(" ".join(t.split()) for t in (r.bench, r.contender, r.result, r.vs, r.goal)) for r in rows),
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(text.replace("|", "\\|").ljust(w) for text, w in zip(row, widths, strict=True))
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in cells[1:])])


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    runs = args.runs or (3 if args.quick else 30)
    started = time.perf_counter()
    if args.quick:
        setup = Setup(python=sys.executable, quick=True)
    elif args.only and set(args.only) <= OWN_PEERS:
        setup = Setup(python=sys.executable, quick=False)
    else:
        python, versions = ensure_peers()
        setup = Setup(python=python, quick=False, peers=versions)
    delays = (
        tuple(d.strip() for d in args.drain_delays.split(",") if d.strip()) if args.drain_delays else None
    )
    names = tuple(n.strip() for n in args.contenders.split(",") if n.strip()) if args.contenders else ()
    source = str(Path(args.graceful_from).resolve()) if args.graceful_from else ""
    _bench_rolling.configure(delays, args.restarts, source, names)
    _bench_import.configure(str(Path(args.import_before).resolve()) if args.import_before else "")
    _bench_chaos.configure(args.jobs, args.stops, args.seeds, args.parallel, names)
    _bench_inplace.configure(args.restarts, source, names, args.method)
    if args.rounds is not None:
        _bench_serving.ROUNDS = max(1, args.rounds)
    rows: list[Row] = []
    for name, bench in SECTIONS.items():
        if (args.only and name not in args.only) or (not args.only and name in OPT_IN):
            continue
        with section(name):
            rows.extend(bench(setup, runs))
    took = time.perf_counter() - started
    print("\n".join(_machine(setup)))
    if args.graceful_from:
        print(f"rolling and inplace contenders: graceful from {Path(args.graceful_from).resolve()}")
    print(f"command: python benchmarks/run.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"runs per figure: {runs}; whole run took {took:.0f} s\n")
    print(format_table(rows))
    if any(row.bench.startswith(_bench_rolling.BENCH) for row in rows):
        print("\nRolling restarts side by side (median / max of each time, seconds from SIGTERM):\n")
        print(_bench_rolling.compact_table(rows))
    if any(row.bench.startswith(_bench_chaos.BENCH) for row in rows):
        print("\nChaos: queue workers stopped at random moments (times: median / max):\n")
        print(_bench_chaos.compact_table(rows))
        print(f"\n{_bench_chaos.peers_line()}")
    if any(row.bench.startswith(_bench_inplace.BENCH) for row in rows):
        print("\nReplaced in place side by side (median / max of each time, seconds from the signal):\n")
        print(_bench_inplace.compact_table(rows))
    _save(args.json, setup, rows, runs)
    return 0


def _save(path: Path | None, setup: Setup, rows: list[Row], runs: int) -> None:
    if path is None:
        if setup.quick:
            return  # the smoke mode leaves nothing behind
        path = ROOT / "benchmarks" / "results" / time.strftime("run-%Y%m%d-%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": _machine(setup),
        "runs": runs,
        "rows": [
            {
                "bench": r.bench,
                "contender": r.contender,
                "result": r.result,
                "vs": r.vs,
                "goal": r.goal,
                "data": r.data,
            }
            for r in rows
        ],
    }
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    log(f"samples written to {path}")


if __name__ == "__main__":
    sys.exit(main())
