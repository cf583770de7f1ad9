"""The suite starts clean under ``coverage run``: data files a failed run left are erased first.

Why: the README's test command is ``coverage run -m pytest && coverage combine -q && coverage
report``. With ``parallel = true`` every process (pytest's and each subprocess a test starts,
measured through ``patch = ["subprocess"]``) writes its own ``.coverage.<host>.<pid>.<random>``
file when it exits, and only ``combine`` removes them. When a test fails, ``&&`` stops before
``combine``: that run's files (~350) stay behind, and the next run's ``combine`` merged them
into its report without a word, lines covered only by an older version of the code included.

coverage has no setting for it: ``coverage run`` erases old data only in non-parallel mode, and
``erase`` is a command of its own. The command's text stays as it is (CI runs it verbatim), so
the suite erases them itself, once, at the start of the session, in the pytest process that
``coverage run`` measures: no file of this run exists then (each process writes its own at
exit, and no test has started a subprocess yet). Only for a run of the whole suite (no test
paths given: pytest's ``testpaths``), as the README's command is: ``coverage run -m pytest
tests/a.py`` then ``... tests/b.py`` then one ``combine`` is a way to add runs up, and is left
alone. Not in an xdist worker (its controller does it), and not when coverage is not measuring
(a plain ``pytest`` leaves the files alone).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

__all__ = ["ERASED", "erase_stale_coverage_data", "stale_coverage_data"]

ERASED = pytest.StashKey[list[Path]]()
"""The stale data files this session erased (for the report header)."""


def stale_coverage_data() -> list[Path]:
    """This measured run's parallel data files already on disk: another run's, at session start."""
    coverage = sys.modules.get("coverage")  # imported by `coverage run`; never imported here
    current = None if coverage is None else coverage.Coverage.current()
    if current is None or not current.config.parallel:
        return []
    data_file = Path(current.config.data_file).absolute()  # as coverage resolves it for children
    return sorted(data_file.parent.glob(data_file.name + ".*"))


def erase_stale_coverage_data(config: pytest.Config) -> list[Path]:
    """Erase the stale parallel data files (see the module docstring); the files erased."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return []
    if config.args_source is not pytest.Config.ArgsSource.TESTPATHS:  # a part: maybe added up
        return []
    erased = []
    for path in stale_coverage_data():
        try:
            path.unlink()
        except FileNotFoundError:  # pragma: no cover - gone meanwhile
            continue
        erased.append(path)
    config.stash[ERASED] = erased
    return erased
