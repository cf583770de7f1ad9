"""Section 11: a service on one machine replaced in place under load, no balancer (issue #25).

    python benchmarks/run.py --only inplace --quick   # < 90 s: 3 replacements a contender
    python benchmarks/run.py --only inplace           # 20 replacements a contender

Why it is built this way:

* Opt-in, like the rolling rig: it runs only when named (``--only inplace``), it needs ``hey``
  (Debian: ``apt-get install hey``; without it one "skipped" row says so), and a full run takes
  minutes of load.
* The rows set today's ways side by side with graceful's upgrade in place: an in-place restart
  (what ``systemctl restart`` does) of graceful's stdlib server and of uvicorn alone, gunicorn's
  own binary upgrade (USR2, then TERM to the old master) alone and under
  ``-c python:graceful.gunicorn``, and graceful's SIGUSR2 upgrade of its stdlib server and of
  uvicorn. The last two say "skipped (graceful.listen not present)" until the graceful the
  children import has ``graceful.listen``: without the feature SIGUSR2's default action kills
  the process, which would measure nothing. ``--graceful-from`` points the children at another
  checkout (the feature's branch), so the rows can be run on it before it is merged.
* Per row: the failed requests (non-2xx, and hey's errors split into refused / reset / other),
  p50/p99 latency of the requests that overlap a replacement's window against the steady state,
  the time from the signal until the old generation is gone (and until the new one serves), the
  old generations' exit codes. The goal of issue #25 is checked on graceful's rows: 0 failed
  and 0 resets over >= 20 upgrades, p99 during an upgrade within 2x the steady state's.
* The quick mode checks that the rig works (it fails only when the rig breaks, never on a
  figure); the full mode reports each contender's row, never stopping on one failure.
* ``--method POST``: hey's Go client replays a GET that failed on a reused keep-alive connection
  (``net/http``: an idempotent request, a connection the server closed) without a word; a POST it
  does not replay, so the race between a server closing a kept-alive connection and a client
  sending on it is counted instead of hidden.
"""

from __future__ import annotations

import subprocess

from _harness import BenchError, Row, Setup, check, exit_text, log, median, term_unwinds
from _inplace_programs import RESTART, Contender, contenders, gunicorn_extra, listen_present
from _inplace_run import RunResult, Upgrade, run_one
from _rolling_programs import chosen, module_present
from _rolling_rig import tool

BENCH = "11. in-place"
QUICK_UPGRADES = 3
FULL_UPGRADES = 20
GOAL_UPGRADES = 20  # issue #25: 0 failed and 0 resets over >= 20 upgrades
options: dict[str, object] = {"upgrades": None, "graceful_from": "", "names": (), "method": "GET"}


def configure(
    upgrades: int | None, graceful_from: str = "", names: tuple[str, ...] = (), method: str = "GET"
) -> None:
    """From run.py's command line: replacements per run, graceful's checkout, the contenders
    (parts of their names; all when empty), hey's HTTP method."""
    options.update(upgrades=upgrades, graceful_from=graceful_from, names=names, method=method)


def run(setup: Setup, runs: int) -> list[Row]:
    if not tool("hey"):
        text = "skipped: hey not found (Debian: apt-get install hey)"
        log(f"inplace: {text}")
        return [Row(BENCH, "every contender", text)]
    source = str(options["graceful_from"])
    method = str(options["method"])
    names: tuple[str, ...] = options["names"]  # type: ignore[assignment]
    upgrades = options["upgrades"] or (QUICK_UPGRADES if setup.quick else FULL_UPGRADES)
    assert isinstance(upgrades, int)
    listen = listen_present(setup.python, source)
    present: dict[str, bool] = {}
    extra: tuple[str, ...] | None = None
    bench = BENCH if method == "GET" else f"{BENCH} ({method})"
    rows: list[Row] = []
    with term_unwinds():
        for contender in chosen(contenders(), names):
            why = _unavailable(contender, setup, listen, present)
            if why:
                rows.append(Row(bench, contender.name, why))
                log(f"inplace: {contender.name}: {why}")
                continue
            if contender.module == "gunicorn" and extra is None:
                extra = gunicorn_extra(setup.python)
            log(f"inplace: {contender.name}, {upgrades} replacements, hey {method}")
            try:
                result = run_one(
                    setup.python,
                    contender,
                    upgrades,
                    graceful_from=source,
                    method=method,
                    gunicorn_extra=extra or (),
                )
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                if setup.quick:
                    raise  # the quick mode checks the rig: a contender that cannot run is a broken rig
                rows.append(Row(bench, contender.name, f"failed: {exc}"))
                continue
            rows.append(_row(bench, contender, result))
            log(f"inplace: {rows[-1].result}")
    return rows


def _unavailable(contender: Contender, setup: Setup, listen: bool, present: dict[str, bool]) -> str:
    if contender.needs_listen and not listen:
        return "skipped (graceful.listen not present)"
    if contender.module:
        if contender.module not in present:
            present[contender.module] = module_present(setup.python, contender.module)
        if not present[contender.module]:
            return f"skipped: {contender.module} not installed in {setup.python}"
    return ""


def _serving(upgrade: Upgrade | dict[str, object]) -> float | None:
    """Seconds from the signal to the new generation serving: a restart's first answer, else ready."""
    get = upgrade.get if isinstance(upgrade, dict) else upgrade.__dict__.get
    value = get("served") if get("served") is not None else get("ready")
    return float(value) if isinstance(value, (int, float)) else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _spread(values: list[float]) -> str:
    return f"{median(values):.2f}/{max(values):.2f} s" if values else "-"


def _spread_s(values: list[float]) -> str:
    return f"{median(values):.2f} / {max(values):.2f} s" if values else "-"


def _code(upgrade: Upgrade) -> str:
    if upgrade.killed:
        return "killed"
    return "unknown" if upgrade.code is None else exit_text(upgrade.code)


def codes(upgrades: list[Upgrade]) -> str:
    seen: dict[str, int] = {}
    for upgrade in upgrades:
        seen[_code(upgrade)] = seen.get(_code(upgrade), 0) + 1
    return ", ".join(f"{text} x{n}" for text, n in seen.items())


def latency(result: RunResult) -> str:
    """p50/p99 in the windows vs the steady state, in ms, and the ratio of the p99s."""
    window, steady = result.window, result.steady
    text = f"p50/p99 {_ms(window[0] if window else None)}/{_ms(window[1] if window else None)} ms"
    text += f" vs steady {_ms(steady[0] if steady else None)}/{_ms(steady[1] if steady else None)} ms"
    if window and steady and steady[1] > 0:
        text += f" (p99 x{window[1] / steady[1]:.1f})"
    return text


def _row(bench: str, contender: Contender, result: RunResult) -> Row:
    ups = result.upgrades
    gone = [u.gone for u in ups if u.gone is not None]
    ready = [v for v in (_serving(u) for u in ups) if v is not None]
    promoted = [u.promoted for u in ups if u.promoted is not None]
    text = (
        f"failed {result.failed} in {len(ups)} {'restarts' if contender.how == RESTART else 'upgrades'} "
        f"(refused {result.refused}, reset {result.reset}, other {result.other}, non-2xx {result.non2xx}); "
        f"{latency(result)}; "
        f"signal -> old gone {_spread(gone)}, -> new serving {_spread(ready)} (median/max); "
        f"old exit {codes(ups)}; "
        + (f"pidfile taken {_spread(promoted)} after USR2; " if promoted else "")
        + f"tracebacks {result.tracebacks}; "
        f"{result.answered} req at {result.answered / result.seconds:.0f}/s"
    )
    goal = ""
    if contender.is_graceful:
        window, steady = result.window, result.steady
        p99_ok = window is not None and steady is not None and window[1] <= 2 * steady[1]
        ok = result.failed == 0 and result.reset == 0 and p99_ok
        goal = check(ok, f"0 failed, 0 resets over >= {GOAL_UPGRADES} upgrades, p99 within 2x steady")
        if len(ups) < GOAL_UPGRADES:
            goal = f"not judged: {len(ups)} < {GOAL_UPGRADES} upgrades ({goal})"
    data = {
        "how": contender.how,
        "failed": result.failed,
        "refused": result.refused,
        "reset": result.reset,
        "other": result.other,
        "non2xx": result.non2xx,
        "non2xx_before": result.non2xx_before,
        "errors": result.errors,
        "answered": result.answered,
        "results": result.results,
        "window": result.window,
        "steady": result.steady,
        "seconds": result.seconds,
        "hey_skew": result.hey_skew,
        "tracebacks": result.tracebacks,
        "traceback_sample": result.traceback_sample,
        "notes": result.notes,
        "upgrades": [vars(u) for u in ups],
    }
    return Row(bench, contender.name, text, "", goal, data)


def compact_table(rows: list[Row]) -> str:
    """The in-place rows side by side: one line per contender, one column per figure."""
    header = ["contender", "replacements", "failed", "refused / reset / other / non-2xx",
              "p50 / p99 in windows (ms)", "p50 / p99 steady (ms)", "signal -> old gone",
              "signal -> new serving", "old exit"]  # fmt: skip
    cells = [header]
    for row in rows:
        if not row.bench.startswith(BENCH):
            continue
        data = row.data
        ups = data.get("upgrades")
        if not isinstance(ups, list):
            cells.append([row.contender, "", row.result.split(":")[0], "", "", "", "", "", ""])
            continue
        window, steady = data["window"], data["steady"]

        def pair(stats: object) -> str:
            return f"{_ms(stats[0])} / {_ms(stats[1])}" if isinstance(stats, (list, tuple)) else "-"

        def spread(key: str, ups: list[dict[str, object]] = ups) -> str:
            values = [float(u[key]) for u in ups if isinstance(u.get(key), (int, float))]  # type: ignore[arg-type]
            return f"{median(values):.2f} / {max(values):.2f} s" if values else "-"

        seen: dict[str, int] = {}
        for u in ups:
            text = "killed" if u["killed"] else "unknown" if u["code"] is None else exit_text(u["code"])
            seen[text] = seen.get(text, 0) + 1
        cells.append(
            [
                row.contender,
                str(len(ups)),
                str(data["failed"]),
                f"{data['refused']} / {data['reset']} / {data['other']} / {data['non2xx']}",
                pair(window),
                pair(steady),
                spread("gone"),
                _spread_s([v for v in (_serving(u) for u in ups) if v is not None]),
                ", ".join(f"{t} x{n}" for t, n in seen.items()),
            ]
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(header))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
