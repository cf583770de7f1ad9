"""The pytest plugin as a user gets it: installed by the entry point, off with ``-p no:graceful``,
no state carried from one test to the next in any order, teardown errors that name leftovers,
and the copyable example in examples/ passing under strict settings.

Inner runs go through ``pytester``; they inherit nothing from our pyproject.toml, so each gets
the strict settings a careful user would have (warnings are errors, strict markers and config).
"""

from __future__ import annotations

import ast
import re

import pytest

import graceful

from .conftest import ROOT, run_python

pytest_plugins = ["pytester"]

STRICT_INI = """
[pytest]
addopts = --strict-markers --strict-config -p no:cacheprovider
filterwarnings = error
xfail_strict = true
"""

BOTH_FIXTURES = """
import signal, sys
import graceful

def test_lifecycle(graceful_lifecycle, request):
    assert request.config.pluginmanager.get_plugin("graceful") is not None
    ran = []
    graceful.add_shutdown_listener(lambda: ran.append(1), name="x")
    graceful_lifecycle.send_signal(signal.SIGTERM)
    assert graceful_lifecycle.wait_for_shutdown(10)
    assert ran == [1]

def test_process(graceful_process):
    proc = graceful_process("from graceful.systemd import notify; notify('READY=1')")
    assert proc.wait(10).notifications == ["READY=1"]
"""

# Every test starts by checking it sees a fresh world, then leaves a different kind of mess.
LEAKS = """
import signal, threading
import graceful
from graceful.lowlevel import join

ORIGINAL = graceful.get_lifecycle()
ORIGINAL_BUDGET = ORIGINAL.status().force_quit
SEEN = []  # every harness so far: none may still have a live sequence thread

def assert_fresh_world(harness):
    for earlier in SEEN:
        assert join(earlier.lifecycle, 0), "a sequence thread leaked"
        assert graceful.get_lifecycle() is not earlier.lifecycle
    SEEN.append(harness)
    assert graceful.get_lifecycle() is harness.lifecycle is not ORIGINAL
    status = graceful.status()
    assert status.state is graceful.State.RUNNING
    assert status.listeners == ()
    assert status.force_quit == 25
    assert not graceful.is_stopping()
    assert harness.force_quit_report is None
    assert harness.exit_codes == []
    assert harness.clock.monotonic() == 0

def test_registers_and_never_shuts_down(graceful_lifecycle):
    assert_fresh_world(graceful_lifecycle)
    graceful.add_wrap_up_listener(lambda: None, name="w")
    graceful.add_shutdown_listener(lambda: None, name="s")
    graceful.add_reload_listener(lambda: None, name="r")

def test_shuts_down(graceful_lifecycle):
    assert_fresh_world(graceful_lifecycle)
    graceful.add_shutdown_listener(lambda: None, name="s")
    graceful_lifecycle.send_signal(signal.SIGTERM)
    assert graceful_lifecycle.wait_for_shutdown(10)

def test_pauses_only(graceful_lifecycle):
    assert_fresh_world(graceful_lifecycle)
    graceful.add_shutdown_listener(lambda: None, name="runs at teardown")
    graceful_lifecycle.send_signal(signal.SIGTSTP)

def test_triggers_and_walks_away(graceful_lifecycle):
    assert_fresh_world(graceful_lifecycle)
    graceful.add_wrap_up_listener(lambda: None, name="w")
    graceful.shutdown("walked away", wait=False)

def test_one_sigint_does_not_force(graceful_lifecycle):
    assert_fresh_world(graceful_lifecycle)
    graceful_lifecycle.send_signal(signal.SIGINT)
    assert graceful_lifecycle.force_quit_report is None

def test_forced(graceful_lifecycle):
    assert_fresh_world(graceful_lifecycle)
    release = threading.Event()
    graceful.add_wrap_up_listener(lambda: release.wait(10), name="stuck")
    graceful_lifecycle.send_signal(signal.SIGTERM)
    graceful_lifecycle.clock.advance(30)
    assert graceful_lifecycle.exit_codes == [70]
    release.set()

def test_changes_budget_and_swaps_the_default(graceful_lifecycle):
    assert_fresh_world(graceful_lifecycle)
    graceful.set_time_to_force_quit(1)
    graceful.use(graceful.Lifecycle(3))

def test_starts_a_process(graceful_process):
    proc = graceful_process("from graceful.systemd import notify; notify('READY=1')")
    assert proc.wait(10).returncode == 0

def test_default_is_untouched_without_the_fixture():
    assert graceful.get_lifecycle() is ORIGINAL
    status = ORIGINAL.status()
    assert status.state is graceful.State.RUNNING
    assert status.listeners == ()
    assert status.force_quit == ORIGINAL_BUDGET
"""

REVERSE = """
def pytest_collection_modifyitems(items):
    items.reverse()
"""

LEAKY_OVERRIDE = """
import pytest
from graceful.testing import LifecycleHarness

@pytest.fixture
def graceful_lifecycle():
    harness = LifecycleHarness().install()
    yield harness
    # Finishes the sequence (no thread may outlive the run) but never puts the default back.
    harness.lifecycle.shutdown("leaky teardown", wait=False)
    assert harness.lifecycle.wait_for_shutdown(10)
"""

LEFTOVERS = """
import signal, threading
import pytest
import graceful

@pytest.fixture
def release():
    event = threading.Event()
    yield event
    event.set()  # torn down after graceful_lifecycle: the stuck listener ends, the run exits

def test_leaves_a_listener_running(release, graceful_lifecycle):
    graceful_lifecycle.teardown_timeout = 0.2
    graceful.add_wrap_up_listener(lambda: release.wait(10), name="drain-forever")
    graceful_lifecycle.send_signal(signal.SIGTERM)

def test_leaves_a_process_running(graceful_process):
    proc = graceful_process(
        "import sys, threading; from graceful.systemd import notify; notify('READY=1'); "
        "sys.stderr.write('serving\\\\n'); threading.Event().wait()"
    )
    proc.wait_for_output("serving")
"""


# Plugins that have nothing to do with these runs; hypothesis's alone costs ~2 s a run in-process.
UNRELATED = ("-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:anyio")


@pytest.fixture
def strict(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(STRICT_INI)
    return pytester


def _order(result: pytest.RunResult) -> list[str]:
    return [rep.nodeid for rep in result.reprec.getreports("pytest_runtest_logreport") if rep.when == "call"]  # type: ignore[attr-defined]


def test_importing_the_plugin_does_nothing() -> None:
    """No thread, handler, wakeup fd or default lifecycle changes; nothing but the plugin is imported."""
    code = """
import signal, sys, threading
import pytest, graceful
from graceful._signals import handled_signals

def snapshot():
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    lc = graceful.get_lifecycle()
    return (
        sorted(t.name for t in threading.enumerate()),
        [signal.getsignal(s) for s in handled_signals()],
        fd, lc, lc.status(),
    )

before, modules = snapshot(), set(sys.modules)
import graceful.pytest_plugin
assert snapshot() == before, (before, snapshot())
print(sorted(set(sys.modules) - modules))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['graceful.pytest_plugin']"


def test_library_code_never_imports_pytest_or_the_plugin() -> None:
    """Only the plugin imports pytest; no module of the package imports the plugin."""
    offenders = []
    for path in sorted((ROOT / "graceful").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            for name in names:
                if path.name != "pytest_plugin.py" and name.split(".")[0] == "pytest":
                    offenders.append(f"{path.name} imports {name}")
                if name.endswith("pytest_plugin"):
                    offenders.append(f"{path.name} imports {name}")
    assert offenders == []


@pytest.mark.timeout(120)
def test_fixtures_work_when_installed(strict: pytest.Pytester) -> None:
    """A fresh pytest, no conftest: the entry point alone brings both fixtures."""
    strict.makepyfile(BOTH_FIXTURES)
    result = strict.runpytest_subprocess(*UNRELATED, "-p", "no:randomly")
    result.assert_outcomes(passed=2)


@pytest.mark.timeout(120)
def test_minus_p_no_graceful_turns_the_plugin_off(strict: pytest.Pytester) -> None:
    """``-p no:graceful``: the fixtures are unknown and the plugin module is not even imported."""
    strict.makepyfile(
        BOTH_FIXTURES
        + """
def test_not_loaded(request):
    assert request.config.pluginmanager.get_plugin("graceful") is None
    assert "graceful.pytest_plugin" not in sys.modules
"""
    )
    result = strict.runpytest_subprocess(*UNRELATED, "-p", "no:randomly", "-p", "no:graceful")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*fixture 'graceful_lifecycle' not found*"])


@pytest.mark.timeout(120)
def test_no_state_leaks_from_one_test_into_the_next_in_any_order(strict: pytest.Pytester) -> None:
    """Random orders (pytest-randomly, several seeds), file order and reversed: all pass."""
    before = graceful.get_lifecycle()
    strict.makepyfile(test_leaks=LEAKS)
    orders = []
    for args in (["-p", "no:randomly"], *(["-p", "randomly", f"--randomly-seed={s}"] for s in (1, 2, 3))):
        result = strict.runpytest_inprocess(*UNRELATED, *args)
        result.assert_outcomes(passed=9)
        orders.append(_order(result))
    strict.makeconftest(REVERSE)
    result = strict.runpytest_inprocess(*UNRELATED, "-p", "no:randomly")
    result.assert_outcomes(passed=9)
    orders.append(_order(result))
    assert orders[-1] == orders[0][::-1]
    assert len({tuple(order) for order in orders}) >= 4  # the orders really differed
    assert graceful.get_lifecycle() is before


@pytest.mark.timeout(120)
def test_the_leak_checks_have_teeth(strict: pytest.Pytester) -> None:
    """The same file with a fixture that never puts the default back: the checks catch it."""
    before = graceful.get_lifecycle()
    strict.makepyfile(test_leaks=LEAKS)
    strict.makeconftest(LEAKY_OVERRIDE)
    try:
        result = strict.runpytest_inprocess(*UNRELATED, "-p", "no:randomly")
    finally:
        graceful.use(before)  # the leaky fixture, by design, left its lifecycle as the default
    assert result.parseoutcomes().get("failed", 0) >= 1
    result.stdout.fnmatch_lines(["*FAILED*test_default_is_untouched_without_the_fixture*"])


@pytest.mark.timeout(120)
def test_teardown_errors_name_the_listener_and_the_process_left_running(strict: pytest.Pytester) -> None:
    """Each test passes, then errors at teardown with what it left and what was done about it."""
    before = graceful.get_lifecycle()
    strict.makepyfile(LEFTOVERS)
    result = strict.runpytest_inprocess(*UNRELATED, "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_listener_running*",
            "*graceful_lifecycle: the test left 1 listener(s) unfinished 0.2 s into teardown:",
            "*wrap_up listener 'drain-forever' is still running",
            "*ERROR at teardown of test_leaves_a_process_running*",
            "*graceful_process: child process (python -c*pid *) was still running at the end of the test: killed it*",
            "serving",
        ]
    )
    assert graceful.get_lifecycle() is before


STUCK_FOR_EVER = """
import signal, threading
import graceful

def test_leaves_a_listener_stuck_for_ever(graceful_lifecycle):
    graceful_lifecycle.teardown_timeout = 0.1
    graceful.add_wrap_up_listener(threading.Event().wait, name="waits-for-ever")
    graceful_lifecycle.send_signal(signal.SIGTERM)
"""


@pytest.mark.timeout(120)
def test_a_listener_stuck_for_ever_errors_at_teardown_and_the_run_still_ends(strict: pytest.Pytester) -> None:
    """Nothing can stop that thread, but it must not hold the test run's interpreter open."""
    strict.makepyfile(STUCK_FOR_EVER)
    result = strict.runpytest_subprocess(*UNRELATED, "-p", "no:randomly", timeout=60)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*wrap_up listener 'waits-for-ever' is still running"])


@pytest.mark.timeout(120)
def test_the_copyable_example_passes_under_strict_settings(strict: pytest.Pytester) -> None:
    """examples/test_my_service.py, copied next to examples/my_service.py as a user would."""
    for name in ("my_service.py", "test_my_service.py"):
        (strict.path / name).write_text((ROOT / "examples" / name).read_text())
    result = strict.runpytest_inprocess(*UNRELATED, "-p", "no:randomly", "-v")
    result.assert_outcomes(passed=3)


def _doc_files() -> dict[str, str]:
    """The ```python blocks of docs/testing.md that start with a ``# name.py`` line."""
    text = (ROOT / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(# (\w+\.py)\n.*?)```", text, flags=re.DOTALL)
    return {name: body for body, name in blocks}


@pytest.mark.timeout(120)
def test_every_example_in_the_testing_docs_passes(strict: pytest.Pytester) -> None:
    """docs/testing.md's files, written out as they are, pass under strict settings."""
    files = _doc_files()
    assert set(files) == {"app.py", "test_app.py", "test_service.py", "test_unittest_style.py"}
    for name, body in files.items():
        (strict.path / name).write_text(body)
    result = strict.runpytest_inprocess(*UNRELATED, "-p", "no:randomly")
    result.assert_outcomes(passed=11)
