"""graceful's pytest plugin: the ``graceful_lifecycle`` and ``graceful_process`` fixtures.

Registered as ``[project.entry-points.pytest11] graceful = "graceful.pytest_plugin"``, the
way anyio ships its plugin, so every project that installs graceful gets the fixtures with no
``conftest.py`` line; ``-p no:graceful`` turns them off. Because pytest imports this module in
*every* test run of such a project, importing it does nothing: it defines two fixtures, imports
only the public ``pytest`` API, and reaches for ``graceful.testing`` only when a test asks for
a fixture. Library code never imports it.

Both fixtures fail the test at teardown (an error "at teardown", with the message below) rather
than warn, when a test leaves something behind: a listener still running after the sequence
was given ``teardown_timeout`` seconds, or a child process still running (it is killed). A
leftover like that is a bug in the test or in the shutdown it tests, and a warning is easy to
miss (or already an error under ``filterwarnings = error``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# Only for type checkers: importing graceful.testing at run time waits for a fixture request.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from graceful.testing import LifecycleHarness, ProcessFactory

__all__ = ["graceful_lifecycle", "graceful_process"]


@pytest.fixture
def graceful_lifecycle() -> Iterator[LifecycleHarness]:
    """A fresh graceful Lifecycle, installed as the default for this test.

    Module-level ``graceful.*`` calls land on it. It has a fake clock
    (``graceful_lifecycle.clock.advance(25)`` fires the force quit) and an exit that records
    instead of exiting (``.force_quit_report`` is the report, ``.exit_codes`` the codes).
    ``.send_signal(signal.SIGTERM)`` acts through graceful's signal table without touching
    process-wide handlers. At teardown the sequence is finished, the previous default is put
    back, and listeners still running are named (the test errors at teardown).
    """
    from graceful.testing import LifecycleHarness

    harness = LifecycleHarness().install()
    yield harness
    problem = harness.close()
    if problem is not None:
        pytest.fail(problem, pytrace=False)


@pytest.fixture
def graceful_process() -> Iterator[ProcessFactory]:
    """Start a Python program (code or a script path) and wait until it sends READY=1.

    ``proc = graceful_process(code_or_path, env=None, ready_timeout=10)``;
    ``proc.send_signal(signal.SIGTERM)``; ``result = proc.wait(10)`` with ``returncode``,
    ``stdout``, ``stderr`` and ``notifications``. A child still running at teardown is killed
    and named (the test errors at teardown). POSIX only.
    """
    from graceful.testing import ProcessFactory

    factory = ProcessFactory()
    yield factory
    problem = factory.close()
    if problem is not None:
        pytest.fail(problem, pytrace=False)
