"""1. Import cost: whole-process ``python -c "import X"`` and ``-X importtime``.

Whole-process time is what a user waits for (interpreter start-up included), measured as the
wall time of a fresh process, many times, interleaved across contenders so that the machine's
noise falls on all of them alike; the median is reported. ``-X importtime`` splits out the cost
of the ``import`` statement itself (its "cumulative" column, summed over the top-level lines
that follow a marker, so the interpreter's own start-up imports are left out) and, for
graceful, the sum of the *self* times of the ``graceful*`` lines: graceful's own modules,
without the standard library they pull in.

Bytecode caches are warmed first (one run of each statement with ``PYTHONDONTWRITEBYTECODE``
removed), so every figure is a cached import, as in production.

``--import-before PATH`` adds graceful from another checkout (``git worktree add PATH REV``), measured
the same way in the same rounds, so a change's effect reads off one run.

The floor: a package of as many *empty* modules as ``import graceful`` loads, measured the
same way in the same rounds. It is what the import machinery alone costs on this machine for
that many files, whatever they hold: graceful's own figure minus the floor is its code.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from _harness import BenchError, Row, Setup, child_env, log, median, ms, ratio, wait_exit

MARK = "--graceful-bench-mark--"
STL = "signal, threading, logging"
OWN_BUDGET = 0.005  # s: graceful's own modules
FLOOR = "graceful_floor"  # the package of empty modules
WHOLE_RATIO = 1.15  # x the stdlib trio
BEFORE: str = ""  # another checkout's graceful, measured beside this one (--import-before)


def configure(before: str) -> None:
    global BEFORE
    BEFORE = before


def _targets(setup: Setup) -> list[tuple[str, str]]:
    """(contender, the statement after ``import``); None for the interpreter alone."""
    targets = [("bare interpreter (`-c pass`)", ""), (f"`import {STL}`", STL), ("graceful", "graceful")]
    for contender, module in (("aiomisc", "aiomisc"), ("cotyledon", "cotyledon"), ("uvicorn", "uvicorn")):
        if setup.has(module):
            targets.append((contender, module))
    if setup.has("grpc"):
        targets.append(("grpcio", "grpc"))
    return targets


def _code(modules: str) -> str:
    return f"import {modules}" if modules else "pass"


def _whole(python: str, modules: str, env: dict[str, str] | None = None) -> float:
    """Wall time of one process, start to exit as seen through a pidfd.

    Not ``subprocess.run(timeout=...)``: with a timeout it polls with sleeps that double up to
    50 ms, which rounds every figure to ~115 ms.
    """
    env = env or child_env()
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-c", _code(modules)], env=env)
    if not wait_exit(proc, 60.0):
        proc.kill()
        proc.wait()
        raise BenchError(f"python -c {_code(modules)!r} did not exit within 60 s")
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"python -c {_code(modules)!r} exited with {proc.returncode}")
    return took


def _importtime(
    python: str, modules: str, own_prefix: str = "graceful", env: dict[str, str] | None = None
) -> tuple[float, float, dict[str, float]]:
    """(cumulative of the statement, self-sum of own_prefix* lines, self time per such module)."""
    code = f"import sys; sys.stderr.write({MARK!r} + '\\n'); {_code(modules)}"
    done = subprocess.run(
        [python, "-X", "importtime", "-c", code],
        env=env or child_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = done.stderr.splitlines()
    lines = lines[lines.index(MARK) + 1 :] if MARK in lines else []
    cumulative = 0.0
    own: dict[str, float] = {}
    for line in lines:
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:") :].split("|")
        if not parts[0].strip().isdigit():
            continue  # the header line
        self_us, cumulative_us, name = int(parts[0]), int(parts[1]), parts[2]
        module = name.strip()
        if len(name) - len(name.lstrip()) == 1:  # depth 0: one space after the bar
            cumulative += cumulative_us / 1e6
        if module == own_prefix or module.startswith(own_prefix + "."):
            own[module] = self_us / 1e6
    return cumulative, sum(own.values()), own


def _imports_asyncio(python: str, modules: str) -> bool:
    code = f"import sys; {_code(modules)}; print('asyncio' in sys.modules)"
    done = subprocess.run(
        [python, "-c", code], env=child_env(), capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip() == "True"


def _floor_package(where: Path, count: int) -> None:
    """``graceful_floor``: ``count`` modules in all (the package and count - 1 submodules), empty."""
    package = where / FLOOR
    package.mkdir()
    names = [f"m{i}" for i in range(1, count)]
    (package / "__init__.py").write_text(f"from . import {', '.join(names)}\n" if names else "")
    for name in names:
        (package / f"{name}.py").write_text("x = 1\n")


def run(setup: Setup, runs: int) -> list[Row]:  # noqa: PLR0912 - one loop: the contenders stay interleaved
    targets = _targets(setup)
    for _, modules in targets:  # warm the bytecode caches
        _whole(setup.python, modules)
    whole: dict[str, list[float]] = {m: [] for _, m in targets}
    cumulative: dict[str, list[float]] = {m: [] for _, m in targets}
    own: list[float] = []
    before_env = child_env({"PYTHONPATH": BEFORE}) if BEFORE else None
    before: dict[str, list[float]] = {"whole": [], "own": []}
    if before_env is not None:
        subprocess.run([setup.python, "-c", "import graceful"], env=before_env, check=True, timeout=60)
    floor: list[float] = []
    per_module: dict[str, list[float]] = {}
    count = len(_importtime(setup.python, "graceful")[2])  # modules import graceful loads
    with tempfile.TemporaryDirectory(prefix="graceful-floor-") as tmp:
        _floor_package(Path(tmp), count)
        floor_env = child_env()
        floor_env["PYTHONPATH"] = tmp
        # warm its bytecode cache too (child_env leaves out PYTHONDONTWRITEBYTECODE)
        subprocess.run([setup.python, "-c", f"import {FLOOR}"], env=floor_env, check=True, timeout=60)
        for i in range(runs):
            for _, modules in targets:
                whole[modules].append(_whole(setup.python, modules))
                total, own_sum, own_modules = _importtime(setup.python, modules)
                cumulative[modules].append(total)
                if modules == "graceful":
                    own.append(own_sum)
                    for name, value in own_modules.items():
                        per_module.setdefault(name, []).append(value)
                    floor.append(_importtime(setup.python, FLOOR, FLOOR, floor_env)[1])
                    if before_env is not None:
                        before["whole"].append(_whole(setup.python, "graceful", before_env))
                        before["own"].append(_importtime(setup.python, "graceful", env=before_env)[1])
            if i == 0:
                log(f"imports: round 1 of {runs} done")
    stl = median(whole[STL])
    bare = median(whole[""])
    rows = []
    for contender, modules in targets:
        w, c = median(whole[modules]), median(cumulative[modules])
        result = f"{ms(w)} whole process"
        if modules:
            result += f"; `-X importtime` cumulative {ms(c)}"
        goal = ""
        data: dict[str, object] = {"whole_s": whole[modules], "cumulative_s": cumulative[modules]}
        if modules == "graceful":
            asyncio_loaded = _imports_asyncio(setup.python, modules)
            own_median = median(own)
            heaviest = sorted(per_module, key=lambda name: -median(per_module[name]))[:3]
            result += (
                f"; own modules {ms(own_median)} (heaviest: "
                + ", ".join(f"{name} {ms(median(per_module[name]))}" for name in heaviest)
                + f"); asyncio {'IMPORTED' if asyncio_loaded else 'not imported'}"
            )
            goal = _goal(own_median, w / stl, asyncio_loaded)
            data.update(
                own_s=own,
                asyncio=asyncio_loaded,
                heaviest_own={name: median(per_module[name]) for name in heaviest},
            )
        vs = f"{ratio(w, stl)} of `{STL}`" if modules else "-"
        if modules and modules != STL:
            vs += f"; {'+' if w >= bare else '-'}{ms(abs(w - bare))} over bare"
        rows.append(Row("1. import", contender, result, vs, goal, data))
        if modules == "graceful" and before_env is not None:
            rows.append(_before_row(before, w, median(own), stl))
        if modules == "graceful":
            rows.append(
                Row(
                    "1. import",
                    f"floor: {count} empty modules",
                    f"own modules {ms(median(floor))} (`-X importtime` self, same rounds)",
                    f"graceful's own code: {ms(median(own) - median(floor))} above it",
                    "",
                    {"own_s": floor, "modules": count},
                )
            )
    return rows


def _before_row(before: dict[str, list[float]], whole: float, own: float, stl: float) -> Row:
    """graceful from the other checkout, and how this one differs from it (same rounds)."""
    wb, ob = median(before["whole"]), median(before["own"])
    return Row(
        "1. import",
        f"graceful before ({Path(BEFORE).name})",
        f"{ms(wb)} whole process; own modules {ms(ob)}",
        f"{ratio(wb, stl)} of `{STL}`; this checkout {ms(whole - wb)} whole, {ms(own - ob)} own",
        "",
        {"whole_s": before["whole"], "own_s": before["own"]},
    )


def _goal(own: float, whole_ratio: float, asyncio_loaded: bool) -> str:
    met = own < OWN_BUDGET and whole_ratio <= WHOLE_RATIO and not asyncio_loaded
    return (
        f"{'met' if met else 'MISSED'}: own modules < 5 ms ({ms(own)}), whole process <= {WHOLE_RATIO}x "
        f"({whole_ratio:.2f}x), {'asyncio IMPORTED' if asyncio_loaded else 'no asyncio'}"
    )
