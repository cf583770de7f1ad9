"""The documentation: the site builds with --strict, and every complete program in it runs.

A complete program in the docs is a ```python block whose first line is ``# name.py``
(docs/testing.md's files are run by tests/test_plugin.py, with pytest). Each one is written to
a temporary folder; a service (it calls ``graceful.run``) is started with the
``graceful_process`` fixture (it waits for READY=1) and stopped with SIGTERM, any other program
runs to its end; either must exit 0 without a traceback. The examples the docs include from
``examples/`` (``--8<--`` lines) are run the same way.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from graceful.testing import ProcessFactory

from .conftest import ROOT

DOCS = ROOT / "docs"
BLOCK = re.compile(r"```python\n# (\w+\.py)\n(.*?)```", flags=re.DOTALL)
INCLUDED = re.compile(r'--8<-- "(examples/\w+\.py)"')
# A snippet marker, as written or as ``ruff format`` mangles it in a python block, raw or
# HTML-escaped: in the built site, any of these means an include that did not happen.
UNEXPANDED = re.compile(r"--8\s*(?:<|&lt;|\\u003c)\s*--")
MANGLED = re.compile(r"--8\s+<\s*--|--8<\s+--")


def _programs() -> dict[str, str]:
    found: dict[str, str] = {}
    for page in sorted(DOCS.rglob("*.md")):
        if page.name == "testing.md":
            continue
        for name, body in BLOCK.findall(page.read_text()):
            found[f"{page.relative_to(DOCS)}:{name}"] = body
    return found


def _included_examples() -> list[str]:
    return sorted({path for page in DOCS.rglob("*.md") for path in INCLUDED.findall(page.read_text())})


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.timeout(180)
def test_the_docs_build_with_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    leftovers = {
        str(page.relative_to(tmp_path / "site")): marker
        for page in (tmp_path / "site").rglob("*")
        if page.suffix in (".html", ".json")
        for marker in UNEXPANDED.findall(page.read_text(errors="replace"))
    }
    assert leftovers == {}, "snippet markers left unexpanded in the built site"


def test_no_snippet_marker_is_mangled_in_the_sources() -> None:
    """``ruff format`` once turned the snippet marker in python blocks into Python: none is left."""
    mangled = {
        f"{page.relative_to(DOCS)}:{n}": line
        for page in DOCS.rglob("*.md")
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if MANGLED.search(line)
    }
    assert mangled == {}


def test_the_docs_have_complete_programs_to_run() -> None:
    assert len(_programs()) >= 6
    assert _included_examples()


def _run_and_stop(graceful_process: ProcessFactory, script: Path, request: pytest.FixtureRequest) -> None:
    text = script.read_text()
    env = {"PORT": _free_port()}  # the programs read these, if anything
    if "REDIS_URL" in text:  # only a program that reads it starts a redis-server
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    if "graceful.run(" not in text:  # not a service: it runs to its end by itself
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **env},
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return
    proc = graceful_process(script, env=env, ready_timeout=20)
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(20)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", sorted(_programs()))
def test_a_complete_program_in_the_docs_runs_and_stops_with_exit_0(
    key: str, tmp_path: Path, graceful_process: ProcessFactory, request: pytest.FixtureRequest
) -> None:
    name = key.rsplit(":", 1)[1]
    script = tmp_path / name
    script.write_text(_programs()[key])
    _run_and_stop(graceful_process, script, request)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", _included_examples())
def test_an_example_the_docs_include_runs_and_stops_with_exit_0(
    path: str, graceful_process: ProcessFactory, request: pytest.FixtureRequest
) -> None:
    _run_and_stop(graceful_process, ROOT / path, request)
