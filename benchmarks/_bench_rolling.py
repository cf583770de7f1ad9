"""Section 7: rolling restarts behind a real HAProxy, each contender under the same load.

    python benchmarks/run.py --only rolling --quick   # < 90 s: 2 graceful + the hand-written server
    python benchmarks/run.py --only rolling           # every contender and variant, 6 restarts each

Why it is built this way:

* Opt-in: the section runs only when named (``--only rolling``), so the default run and the
  suite's ``--quick`` smoke test do not pay for it, and it needs ``haproxy`` and ``hey`` (Debian:
  ``apt-get install haproxy hey``): without them it prints one "skipped" row saying so.
* The quick mode checks that the *rig* works (HAProxy, hey, the controller, the contenders start
  and come back): it fails only when the rig breaks, never on a figure. The full mode runs every
  contender in every variant (client keep-alive on/off x HAProxy ``retries 0`` / ``retries 3``
  with ``option redispatch``) and reports each contender's row, never stopping on one failure.
* The graceful contenders come once per drain-delay setting (``--drain-delays``, default
  ``1,auto``); a setting the installed graceful rejects gives a "not available" row.
* SIGTERM to the benchmark itself is turned into KeyboardInterrupt while the section runs, so
  that, like Ctrl-C, it unwinds through the rig's cleanup and leaves no process behind.
"""

from __future__ import annotations

import subprocess

from _harness import BenchError, Row, Setup, check, exit_text, log, median, term_unwinds
from _rolling_programs import Contender, chosen, contenders, delay_accepted, module_present
from _rolling_rig import tool
from _rolling_run import RunResult, Variant, run_one

BENCH = "8. rolling restarts"
VARIANTS = [Variant(True, 0), Variant(True, 3), Variant(False, 0), Variant(False, 3)]
QUICK_RESTARTS = 3
FULL_RESTARTS = 6
options: dict[str, object] = {"delays": ("1", "auto"), "restarts": None, "graceful_from": "", "names": ()}


def configure(
    delays: tuple[str, ...] | None, restarts: int | None, graceful_from: str = "", names: tuple[str, ...] = ()
) -> None:
    """From run.py's command line: the drain-delay settings, the restarts per run, graceful's
    checkout, the contenders to run (parts of their names; all when empty)."""
    if delays:
        options["delays"] = delays
    options["restarts"] = restarts
    options["graceful_from"] = graceful_from
    options["names"] = names


def run(setup: Setup, runs: int) -> list[Row]:
    missing = [name for name in ("haproxy", "hey") if not tool(name)]
    if missing:
        text = f"skipped: {' and '.join(missing)} not found (Debian: apt-get install haproxy hey)"
        log(f"rolling: {text}")
        return [Row(BENCH, "every contender", text)]
    delays: tuple[str, ...] = options["delays"]  # type: ignore[assignment]
    source = str(options["graceful_from"])
    if source:
        log(f"rolling: graceful from {source}")
    accepted = {delay: delay_accepted(setup.python, delay, source) for delay in delays}
    quick_delay = "auto" if setup.quick and not accepted.get("auto", "auto?") else "1"
    if setup.quick and quick_delay not in accepted:
        accepted[quick_delay] = delay_accepted(setup.python, quick_delay, source)
        delays = (*delays, quick_delay)
    names: tuple[str, ...] = options["names"]  # type: ignore[assignment]
    restarts = options["restarts"] or (QUICK_RESTARTS if setup.quick else FULL_RESTARTS)
    assert isinstance(restarts, int)
    present: dict[str, bool] = {}
    rows: list[Row] = []
    variants = VARIANTS[:1] if setup.quick else VARIANTS
    with term_unwinds():
        for variant in variants:
            for contender in chosen(contenders(delays, quick_delay), names):
                if setup.quick and not contender.quick and not names:
                    continue
                bench = f"{BENCH} ({variant.label})"
                why = _unavailable(contender, setup, accepted, present)
                if why:
                    rows.append(Row(bench, contender.name, why))
                    continue
                log(f"rolling: {contender.name}, {variant.label}, {restarts} restarts")
                try:
                    result = run_one(setup.python, contender, variant, restarts, source)
                except (
                    BenchError,
                    OSError,
                    subprocess.SubprocessError,
                ) as exc:  # HAProxy gone, a child stuck
                    if setup.quick:
                        raise  # the quick mode checks the rig: a contender that cannot run is a broken rig
                    rows.append(Row(bench, contender.name, f"failed: {exc}"))
                    continue
                rows.append(_row(bench, contender, variant, result))
                log(f"rolling: {rows[-1].result}")
    return rows


def _unavailable(
    contender: Contender, setup: Setup, accepted: dict[str, str], present: dict[str, bool]
) -> str:
    if contender.drain_delay and accepted.get(contender.drain_delay):
        return (
            f"not available: the installed graceful rejects GRACEFUL_DRAIN_DELAY={contender.drain_delay} "
            f"({accepted[contender.drain_delay][:120]})"
        )
    if contender.module:
        if contender.module not in present:
            present[contender.module] = module_present(setup.python, contender.module)
        if not present[contender.module]:
            return f"skipped: {contender.module} not installed in {setup.python}"
    return ""


def _spread(values: list[float]) -> str:
    return f"{median(values):.2f}/{max(values):.2f} s" if values else "-"


def _row(bench: str, contender: Contender, variant: Variant, result: RunResult) -> Row:
    restarts = result.restarts
    downs = [r.down for r in restarts if r.down is not None]
    exits = [r.exit for r in restarts if r.exit is not None]
    ups = [r.up for r in restarts]
    codes: dict[str, int] = {}
    for r in restarts:
        text = exit_text(r.code)
        codes[text] = codes.get(text, 0) + 1
    haproxy = {
        key: sum(r.haproxy.get(key, 0) for r in restarts)
        for key in ("fe_5xx", "wretr", "wredis", "econ", "eresp", "srv_abrt")
    }
    never_down = len(restarts) - len(downs)
    text = (
        f"failed {result.failed} in {len(restarts)} restarts "
        f"(per restart {','.join(str(r.failed + r.unanswered) for r in restarts)}"
        + (f"; {result.unanswered} of them with no answer" if result.unanswered else "")
        + (f"; {result.failed_before} before the first" if result.failed_before else "")
        + f"); HAProxy 5xx {haproxy['fe_5xx']}, retries {haproxy['wretr']}, redispatches {haproxy['wredis']}, "
        f"conn err {haproxy['econ']}, resp err {haproxy['eresp']}, server aborts {haproxy['srv_abrt']}; "
        f"median/max: down {_spread(downs)}"
        + (f" (never marked down x{never_down})" if never_down else "")
        + f", exit {_spread(exits)}, back {_spread(ups)}; "
        f"exit {', '.join(t if len(codes) == 1 else f'{t} x{n}' for t, n in codes.items())}; "
        f"tracebacks {result.tracebacks}; {result.requests} req at {result.requests / result.seconds:.0f}/s"
    )
    goal = ""
    if contender.is_graceful and variant == Variant(True, 0):
        ok = result.failed == 0 and result.tracebacks == 0
        if contender.drain_delay.startswith("auto") and not contender.gunicorn:  # gunicorn boots slower
            goal = check(ok and median(ups) < 0.6, "0 failed, median back < 0.6 s, no traceback")
        else:
            goal = check(ok, "0 failed, no traceback")
    data = {
        "variant": variant.label,
        "failed": result.failed,
        "unanswered": result.unanswered,
        "haproxy_log_states": result.logged_states,
        "haproxy_log_sample": result.logged_sample,
        "failed_before": result.failed_before,
        "tracebacks": result.tracebacks,
        "requests": result.requests,
        "seconds": result.seconds,
        "hey_skew": result.hey_skew,
        "restarts": [vars(r) for r in restarts],
        "traceback_sample": result.traceback_sample,
    }
    return Row(bench, contender.name, text, "", goal, data)


def compact_table(rows: list[Row]) -> str:
    """The rolling rows side by side: one line per contender and variant, one column per figure."""
    header = ["contender", "variant", "failed (per restart)", "down", "exit", "back in rotation",
              "tracebacks", "HAProxy 5xx / retries / redispatches"]  # fmt: skip
    cells = [header]
    for row in rows:
        if not row.bench.startswith(BENCH):
            continue
        variant = row.bench[len(BENCH) :].strip(" ()") or "-"
        data = row.data
        restarts = data.get("restarts")
        if not isinstance(restarts, list):
            cells.append([row.contender, variant, row.result.split(":")[0], "", "", "", "", ""])
            continue

        def spread(key: str, restarts: list[dict[str, object]] = restarts) -> str:
            values = [float(r[key]) for r in restarts if isinstance(r.get(key), (int, float))]  # type: ignore[arg-type]
            return f"{median(values):.2f} / {max(values):.2f} s" if values else "-"

        per = ",".join(str(int(r["failed"]) + int(r["unanswered"])) for r in restarts)
        codes = sorted({exit_text(r["code"]) for r in restarts})  # type: ignore[arg-type]
        haproxy = [sum(int(r["haproxy"].get(k, 0)) for r in restarts) for k in ("fe_5xx", "wretr", "wredis")]
        cells.append(
            [
                row.contender,
                variant,
                f"{data['failed']} ({per})",
                spread("down"),
                f"{spread('exit')} ({', '.join(codes)})",
                spread("up"),
                str(data["tracebacks"]),
                " / ".join(map(str, haproxy)),
            ]
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(header))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
