"""Section 10: queue workers stopped at random moments, with graceful and without (issues #28, #29).

    python benchmarks/run.py --only chaos --quick   # 3 graceful rows, 60 jobs, 3 stops each, < 60 s
    python benchmarks/run.py --only chaos           # every row, 2 seeds x 500 jobs, 12 stops each

Why it is built this way:

* **Opt-in**, like the rolling rig: minutes long, it runs only when named (``--only chaos``).
* **Rows are data** (``ROWS``): a queue (how to start its worker, the program module that also
  enqueues), graceful or not, the force-quit budget, Celery's acks. A row whose graceful host
  is not in the checkout (``graceful.dramatiq``, ``graceful.arq``: issue #28) prints "skipped
  (... not present)".
* **Every queue's own worker, at its defaults**, beside the same worker under graceful:
  ``rq.Worker`` / ``graceful.run(rq.SimpleWorker)``; ``celery worker --pool prefork -c 2`` with
  and without ``graceful.celery.install(app)``, with ``acks_late`` and with Celery's default
  early acks; graceful's ``Worker`` over a Redis list / the same loop with a hand-written
  SIGTERM flag; ``dramatiq``'s CLI; ``arq``'s CLI. Concurrency 2 everywhere but rq (one job
  per worker is rq's model). Celery runs ``--without-gossip --without-mingle
  --without-heartbeat`` (the usual production flags; mingle alone costs a second per start).
* **Two budgets per graceful row**: 3 s (no job of 10-500 ms should reach it) and 0.2 s (most
  stops with a job in hand reach it: what graceful does at its deadline is what is measured).
  Plain rows get the controller's bound (``BOUND``, a platform's grace period), then SIGKILL.
* **The peers' environments**: a full run installs Celery (with its Redis extra), rq and
  Dramatiq into ``benchmarks/.peers-chaos`` and arq into ``benchmarks/.peers-arq`` (arq pins
  redis-py < 6, kombu's Redis extra wants >= 6.4: they cannot share one). ``--quick`` uses the
  current interpreter and skips the queues it lacks.
* **Runs side by side** (``--parallel``, 4 by default): each run has its own redis-server and
  waits on sleeping jobs, so four at once fit 2 cores; the timings are then those of a busy
  machine, the same for every row (the rows of one seed are interleaved).
"""

from __future__ import annotations

import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import _chaos_run
from _chaos_run import Launch, Outcome
from _harness import ROOT, BenchError, Row, Setup, check, ensure_venv, exit_text, log, median, ms

BENCH = "10. chaos"
BOUND = 10.0  # seconds from SIGTERM before the controller SIGKILLs a worker
SHORT = 0.2  # the short budget, seconds (issue #29's)
LONG = 3.0
CELERY = "import sys; from celery.__main__ import main; sys.exit(main())"
VENVS = {  # name -> (import names, pip requirements)
    "chaos": (
        ("celery", "kombu", "rq", "dramatiq", "redis"),
        ("celery[redis]", "kombu", "rq", "dramatiq[redis]", "redis"),
    ),
    "arq": (("arq", "redis"), ("arq", "redis")),
}


@dataclass(frozen=True)
class Queue:
    name: str
    module: str  # the program (and enqueue) module under benchmarks/
    argv: tuple[str, ...]  # after the interpreter
    library: str  # the import name that must be installed
    venv: str  # which of VENVS a full run uses
    concurrency: int
    restart: float = 1.0  # seconds a stop and restart roughly costs: only to order the runs


CELERY_ARGV = ("-c", CELERY, "-A", "_chaos_celery", "worker", "--pool", "prefork", "--concurrency", "2",
               "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat")  # fmt: skip
DRAMATIQ_ARGV = ("-m", "dramatiq", "_chaos_dramatiq", "--processes", "1", "--threads", "2")
QUEUES = {
    "rq": Queue("rq", "_chaos_rq", ("-m", "_chaos_rq"), "rq", "chaos", 1),
    "celery": Queue("celery", "_chaos_celery", CELERY_ARGV, "celery", "chaos", 2, 4.0),
    "worker": Queue("worker", "_chaos_worker", ("-m", "_chaos_worker"), "redis", "chaos", 2),
    "dramatiq": Queue("dramatiq", "_chaos_dramatiq", DRAMATIQ_ARGV, "dramatiq", "chaos", 2, 2.0),
    "arq": Queue("arq", "_chaos_arq", ("-m", "arq", "_chaos_arq.WorkerSettings"), "arq", "arq", 2),
}


@dataclass(frozen=True)
class Contender:
    name: str
    queue: str
    graceful: bool = False
    budget: float | None = None  # GRACEFUL_FORCE_QUIT
    acks: str = ""  # Celery: "late" (acks_late=True) or "early" (its default)
    host: str = ""  # the graceful module the row needs (under graceful/), if not always there
    quick: bool = False
    env: tuple[tuple[str, str], ...] = ()  # more environment for the worker

    @property
    def label(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def _pair(
    queue: str, plain: str, graceful: str, *, host: str = "", quick: bool = False, acks: str = ""
) -> list[Contender]:
    """A queue's plain row and its graceful rows (budget 3 s and 0.2 s)."""
    return [
        Contender(plain, queue, acks=acks),
        Contender(f"{graceful}, budget {LONG:g} s", queue, True, LONG, acks, host),
        Contender(f"{graceful}, budget {SHORT:g} s", queue, True, SHORT, acks, host, quick),
    ]


ROWS: list[Contender] = [
    *_pair("rq", "rq.Worker (rq's own)", "graceful.run(rq.SimpleWorker)", quick=True),
    *_pair(
        "celery",
        "Celery prefork -c 2, acks_late",
        "Celery acks_late + graceful.celery",
        acks="late",
        quick=True,
    ),
    *_pair("celery", "Celery prefork -c 2, early acks", "Celery early acks + graceful.celery", acks="early"),
    Contender(  # issue #29's opt-in: early-acknowledged tasks cut at the deadline are sent again
        f"Celery early acks + graceful.celery, resend_early_acked, budget {SHORT:g} s",
        "celery",
        True,
        SHORT,
        "early",
        env=(("GRACEFUL_CELERY_RESEND_EARLY_ACKED", "1"),),
    ),
    *_pair(
        "worker", "Redis-list loop, hand-written SIGTERM flag", "graceful Worker (Redis list)", quick=True
    ),
    *_pair("dramatiq", "dramatiq CLI (Redis broker)", "dramatiq + graceful.dramatiq", host="dramatiq"),
    *_pair("arq", "arq CLI", "arq + graceful.arq", host="arq"),
]
options: dict[str, object] = {"jobs": None, "stops": None, "seeds": None, "parallel": None, "names": ()}
_used: dict[str, tuple[str, dict[str, str]]] = {}  # the environments the last run used


def configure(
    jobs: int | None, stops: int | None, seeds: int | None, parallel: int | None, names: tuple[str, ...]
) -> None:
    """From run.py's command line (each None: the mode's default)."""
    options.update(jobs=jobs, stops=stops, seeds=seeds, parallel=parallel, names=names)


def _settings(quick: bool) -> tuple[int, int, list[int], int]:
    jobs = options["jobs"] or (60 if quick else 500)
    stops = options["stops"] or (3 if quick else 12)
    seeds = list(range(1, 1 + int(options["seeds"] or (1 if quick else 2))))  # type: ignore[call-overload]
    parallel = options["parallel"] or 4
    return int(jobs), int(stops), seeds, int(parallel)  # type: ignore[call-overload]


def _host_present(host: str) -> bool:
    folder = ROOT / "graceful"
    return (folder / f"{host}.py").exists() or (folder / host / "__init__.py").exists()


def _pythons(setup: Setup) -> dict[str, tuple[str, dict[str, str]]]:
    """venv name -> (python, module -> version); the current interpreter for --quick."""
    if setup.quick:
        from _harness import peer_versions

        modules = sorted({m for mods, _ in VENVS.values() for m in mods})
        versions = peer_versions(setup.python, modules, modules)
        return dict.fromkeys(VENVS, (setup.python, versions))
    return {
        name: ensure_venv(ROOT / "benchmarks" / f".peers-{name}", modules, reqs)
        for name, (modules, reqs) in VENVS.items()
    }


def peers_line() -> str:
    """Which interpreter and which versions of the queues the chaos rows ran with."""
    parts = []
    for python, versions in dict(_used.values()).items():  # --quick: one interpreter for all
        listed = ", ".join(f"{module} {version}" for module, version in sorted(versions.items()))
        parts.append(f"{python} ({listed or 'none'})")
    return "chaos peers: " + "; ".join(parts)


def _unavailable(contender: Contender, pythons: dict[str, tuple[str, dict[str, str]]]) -> str:
    queue = QUEUES[contender.queue]
    if contender.graceful and contender.host and not _host_present(contender.host):
        return f"skipped (graceful.{contender.host} not present)"
    python, versions = pythons[queue.venv]
    if queue.library not in versions:
        return f"skipped: {queue.library} not installed in {python}"
    return ""


def _launch(contender: Contender, python: str) -> Launch:
    queue = QUEUES[contender.queue]
    env = {"CHAOS_GRACEFUL": "1" if contender.graceful else "0"}
    if contender.acks:
        env["CHAOS_ACKS"] = contender.acks
    if contender.budget is not None:
        env["GRACEFUL_FORCE_QUIT"] = f"{contender.budget:g}"
    env.update(contender.env)
    return Launch(python, queue.argv, queue.module, env, queue.concurrency)


@contextmanager
def _unwinds() -> Iterator[None]:
    """SIGTERM to the benchmark unwinds like Ctrl-C, and every worker is killed on the way out."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = None
    with suppress(ValueError):  # not the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except BaseException:
        _chaos_run.kill_all()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run(setup: Setup, runs: int) -> list[Row]:
    try:
        import redis  # noqa: F401 - the controller reads the results with it

        sys.path.insert(0, str(ROOT))
        from tests.support.redis_server import RedisServer, find_redis_server

        find_redis_server()
    except (ImportError, RuntimeError) as exc:
        text = f"skipped: no redis-server or redis-py ({exc}); install the test extra"
        log(f"chaos: {text}")
        return [Row(BENCH, "every queue", text)]
    jobs, stops, seeds, parallel = _settings(setup.quick)
    names: tuple[str, ...] = options["names"]  # type: ignore[assignment]
    chosen = [c for c in ROWS if (_named(c, names) if names else (c.quick or not setup.quick))]
    pythons = _pythons(setup)
    _used.clear()
    _used.update(pythons)
    skipped = {c: why for c in chosen if (why := _unavailable(c, pythons))}
    # the longest runs first, so that the last ones to finish are short
    todo = sorted(
        ((c, seed) for seed in seeds for c in chosen if c not in skipped),
        key=lambda cs: -_estimate(cs[0], jobs, stops),
    )
    with _log_folder(keep=not setup.quick) as logs:
        log(
            f"chaos: {jobs} jobs, {stops} stops, seeds {seeds}, {parallel} runs at once; worker logs in {logs}"
        )
        results = _execute(
            todo, pythons, logs, parallel, jobs=jobs, stops=stops, server=RedisServer, quick=setup.quick
        )
    rows: list[Row] = []
    for contender in chosen:
        outcomes = [results.get((contender, seed), "") for seed in seeds]
        failed = [o for o in outcomes if isinstance(o, str)]
        if contender in skipped or failed:
            rows.append(Row(BENCH, contender.name, skipped.get(contender) or str(failed[0])))
        else:
            rows.append(_row(contender, outcomes, jobs, None if setup.quick else logs))  # type: ignore[arg-type]
    return rows


def _named(contender: Contender, names: tuple[str, ...]) -> bool:
    return any(name.lower() in contender.name.lower() for name in names)


def _estimate(contender: Contender, jobs: int, stops: int) -> float:
    queue = QUEUES[contender.queue]
    return jobs * sum(_chaos_run.LENGTH) / 2 / queue.concurrency + stops * queue.restart


@contextmanager
def _log_folder(*, keep: bool) -> Iterator[Path]:
    """benchmarks/results/chaos-<time>/ for a full run (one log per row and seed); a temporary
    folder, removed, for --quick."""
    if keep:
        folder = ROOT / "benchmarks" / "results" / time.strftime("chaos-%Y%m%d-%H%M%S")
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="graceful-chaos-logs-") as temp:
        yield Path(temp)


def _execute(
    todo: list[tuple[Contender, int]],
    pythons: dict[str, tuple[str, dict[str, str]]],
    logs: Path,
    parallel: int,
    *,
    jobs: int,
    stops: int,
    server: type,
    quick: bool,
) -> dict[tuple[Contender, int], Outcome | str]:
    """Every (row, seed) run, ``parallel`` at once; a run that fails says why (--quick: raises)."""
    results: dict[tuple[Contender, int], Outcome | str] = {}
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="chaos") as pool, _unwinds():
        futures: dict[Future[Outcome], tuple[Contender, int]] = {}
        for contender, seed in todo:
            launch = _launch(contender, pythons[QUEUES[contender.queue].venv][0])
            future = pool.submit(
                _one, contender, launch=launch, seed=seed, jobs=jobs, stops=stops, logs=logs, server=server
            )
            futures[future] = (contender, seed)
        for future, key in futures.items():
            try:
                results[key] = future.result()
            except BenchError as exc:
                if quick:
                    raise
                results[key] = f"failed: {exc}"
    return results


def _one(
    contender: Contender,
    *,
    launch: Launch,
    seed: int,
    jobs: int,
    stops: int,
    logs: Path,
    server: type,
) -> Outcome:
    log(f"chaos: {contender.name}, seed {seed} ...")
    outcome = _chaos_run.run_one(
        launch,
        seed=seed,
        jobs=jobs,
        stops=stops,
        bound=BOUND,
        logfile=logs / f"{contender.label}-seed{seed}.log",
        redis_server=server,
        label=contender.label,
    )
    lost = f"{len(outcome.lost)} lost" + (f" ({outcome.stranded} unacked)" if outcome.stranded else "")
    log(
        f"chaos: {contender.name}, seed {seed}: {len(outcome.stops)} stops, {lost}, "
        f"{outcome.duplicates} duplicated, {outcome.took:.0f} s"
    )
    return outcome


# -- the figures -----------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return f"{ms(median(values))} / {ms(max(values))}" if values else "-"


def _figures(outcomes: list[Outcome]) -> dict[str, object]:
    stops = [s for o in outcomes for s in o.stops]
    finals = [o.final for o in outcomes if o.final is not None]
    codes = Counter(exit_text(-9 if s.killed else s.code) for s in stops)
    return {
        "stops": len(stops),
        "keys": sum(o.expected for o in outcomes),
        "lost": sum(len(o.lost) for o in outcomes),
        "stranded": sum(o.stranded for o in outcomes),
        "duplicated": sum(o.duplicates for o in outcomes),
        "codes": dict(sorted(codes.items(), key=lambda kv: -kv[1])),
        "term_exit": [s.exit - s.term for s in stops if not s.early],
        "last_job_exit": [s.last_job for s in stops if s.last_job is not None],
        "children": sum(s.children for s in stops) + sum(s.children for s in finals),
        "dying": sum(s.dying for s in stops) + sum(s.dying for s in finals),
        "killed": sum(s.killed for s in stops) + sum(s.killed for s in finals),
        "cut": sum(s.cut for s in stops),
        "stops_cut": sum(1 for s in stops if s.cut),
        "early": sum(s.early for s in stops),
        "drained": all(o.drained for o in outcomes),
        "seconds": [round(o.took, 1) for o in outcomes],
    }


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{code} x{n}" for code, n in codes.items()) or "-"


def _row(contender: Contender, outcomes: list[Outcome], jobs: int, logs: Path | None) -> Row:
    f = _figures(outcomes)
    term_exit: list[float] = f["term_exit"]  # type: ignore[assignment]
    last: list[float] = f["last_job_exit"]  # type: ignore[assignment]
    lost = f"{f['lost']}" + (f" ({f['stranded']} stranded unacked)" if f["stranded"] else "")
    text = (
        f"{f['stops']} stops over {len(outcomes)} seed{'s' if len(outcomes) > 1 else ''} of {jobs} jobs ({f['keys']} keys): lost {lost}, "
        f"duplicated {f['duplicated']}, jobs cut {f['cut']} (in {f['stops_cut']} stops); exit "
        f"{_codes(f['codes'])}; SIGTERM->exit median/max {_spread(term_exit)}; last job->exit "
        f"{_spread(last)} ({len(last)} stops); children left {f['children']}; killed past "
        f"{BOUND:g} s {f['killed']}" + (f"; exited before the SIGTERM {f['early']}" if f["early"] else "")
    )
    goal = ""
    if contender.graceful:
        ok = f["lost"] == 0 and f["duplicated"] <= f["cut"] and f["children"] == 0  # type: ignore[operator]
        goal = check(ok, "0 lost, duplicates <= jobs cut, 0 children left")
        if last:
            goal += "; " + check(max(last) <= 0.25, "exit <= 250 ms after the last job")
    data = {
        **f,
        "seeds": [o.seed for o in outcomes],
        "jobs": jobs,
        "lost_keys": {str(o.seed): o.lost[:200] for o in outcomes},
        "lost_found_in": {str(o.seed): o.found for o in outcomes},
        "leftover": {str(o.seed): o.leftover for o in outcomes},
        "duplicated_keys": {str(o.seed): o.duplicated[:200] for o in outcomes},
        "per_stop": [[vars(s) for s in o.stops] for o in outcomes],
        "logs": str(logs) if logs else "",
    }
    return Row(BENCH, contender.name, text, "", goal, data)


def compact_table(rows: list[Row]) -> str:
    """The chaos rows with one column per figure (the table of issues #28 and #29)."""
    header = ["row", "stops", "lost", "duplicated", "jobs cut", "exit codes", "SIGTERM->exit median / max",
              "last job->exit median / max (stops)", "children left", "killed past bound"]  # fmt: skip
    cells = [header]
    for row in rows:
        if not row.bench.startswith(BENCH):
            continue
        f = row.data
        if "stops" not in f:
            cells.append([row.contender, row.result, *[""] * (len(header) - 2)])
            continue
        lost = f"{f['lost']}" + (f" ({f['stranded']} unacked)" if f["stranded"] else "")
        last: list[float] = f["last_job_exit"]  # type: ignore[assignment]
        cells.append(
            [
                row.contender,
                str(f["stops"]),
                lost,
                str(f["duplicated"]),
                f"{f['cut']} ({f['stops_cut']} stops)",
                _codes(f["codes"]),  # type: ignore[arg-type]
                _spread(f["term_exit"]),  # type: ignore[arg-type]
                f"{_spread(last)} ({len(last)})",
                str(f["children"]),
                str(f["killed"]),
            ]
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(header))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
