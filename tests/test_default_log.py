"""Issue #27 (12): graceful's log is seen when nobody configured logging, and only then.

Each program runs in a child process: the point is what a fresh interpreter prints (in this
process pytest's own handlers are on the root logger, which is "configured").
"""

from __future__ import annotations

import logging
import re
import signal

import pytest

from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT, run_python
from .support.web import free_port


def readme_run_snippet() -> str:
    """The README's own ``graceful.run(server)`` program, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    found = [block for block in blocks if "graceful.run(server)" in block and "import graceful" in block]
    assert found, "the README has no complete graceful.run(server) snippet"
    return found[0]


@pytest.mark.timeout(30)
def test_the_readme_run_snippet_prints_graceful_lines(graceful_process: ProcessFactory) -> None:
    """Run as written (only the port changed), stopped with SIGTERM: graceful's lines on stderr."""
    code = readme_run_snippet()
    assert code.count("8000") == 1
    child = graceful_process(code.replace("8000", str(free_port())))
    child.wait_for_output("INFO graceful: all 1 server(s) started: ready", stream="stderr")
    child.send_signal(signal.SIGTERM)
    result = child.wait(BOUND)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    for line in ("INFO graceful: server 'ThreadingHTTPServer' started", "INFO graceful: stopped"):
        assert line in err, err
    assert err.count("INFO graceful: all 1 server(s) started: ready") == 1  # one handler, not two


# A program that returns at once under run(): what it prints is graceful's log, and then the
# state of graceful's logger.
PROGRAM = r"""
import logging, sys
import graceful
from graceful._diagnostics import log_to_stderr_by_default
{before}
def serve():
    {during}
graceful.run(serve)
log_to_stderr_by_default()  # again: idempotent
logger = logging.getLogger("graceful")
print(len(logger.handlers), logging.getLevelName(logger.level), logger.filters == [])
"""


def program(before: str = "", during: str = "pass") -> str:
    return PROGRAM.format(before=before, during=during)


def test_an_unconfigured_program_gets_one_handler_at_info_once() -> None:
    result = run_python(program())
    assert result.returncode == 0, result.stderr
    assert "INFO graceful: all 1 server(s) started: ready" in result.stderr
    assert result.stdout.split() == ["1", "INFO", "False"]


def test_a_program_that_configured_logging_is_never_touched() -> None:
    """basicConfig first: graceful's lines once, in the program's format; its logger untouched."""
    before = "logging.basicConfig(level=logging.INFO, format='APP %(name)s %(message)s')"
    result = run_python(program(before=before))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("APP graceful all 1 server(s) started: ready") == 1
    assert "INFO graceful:" not in result.stderr
    assert result.stdout.split() == ["0", "NOTSET", "True"]


def test_a_level_or_propagation_chosen_for_graceful_is_kept() -> None:
    """A level set on graceful's logger is kept; a graceful that does not propagate is left alone."""
    warning = run_python(program(before="logging.getLogger('graceful').setLevel(logging.WARNING)"))
    assert warning.returncode == 0, warning.stderr
    assert "INFO graceful" not in warning.stderr
    assert warning.stdout.split()[:2] == ["1", "WARNING"]
    silent = run_python(program(before="logging.getLogger('graceful').propagate = False"))
    assert silent.returncode == 0, silent.stderr
    assert silent.stdout.split() == ["0", "NOTSET", "True"]


def test_logging_configured_after_start_retires_graceful_handler() -> None:
    """Celery configures logging after graceful started: no line twice, the program's level rules,
    and graceful's logger ends as the program left it."""
    during = "logging.basicConfig(level=logging.WARNING, format='APP %(levelname)s %(name)s %(message)s')"
    result = run_python(program(during=during))
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "INFO graceful: all 1 server(s) started: ready" in err  # before: graceful's own handler
    assert "server 'serve' returned on its own" not in err  # after: INFO is below the program's level
    assert "APP INFO" not in err
    assert result.stdout.split() == ["0", "NOTSET", "True"]


def test_under_pytest_the_root_logger_is_configured_and_nothing_changes() -> None:
    """In this process pytest's handlers are on the root logger: the helper does nothing."""
    from graceful._diagnostics import log_to_stderr_by_default

    assert logging.getLogger().handlers
    assert log_to_stderr_by_default() is False
    assert logging.getLogger("graceful").handlers == []
