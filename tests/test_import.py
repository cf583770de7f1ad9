"""``import graceful`` stays light: standard library only, and no asyncio."""

from __future__ import annotations

import sys
import types

import graceful

from .conftest import run_python

HEAVY = (
    "asyncio",
    "uvicorn",
    "grpc",
    "aiohttp",
    "redis",
    "rq",
    "concurrent.futures",
    "graceful.pytest_plugin",
)


def test_import_graceful_imports_nothing_heavy_and_nothing_third_party() -> None:
    code = (
        "import sys; before = set(sys.modules); import graceful; "
        "new = sorted(set(sys.modules) - before); print('\\n'.join(new))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    new = result.stdout.split()
    for name in HEAVY:
        assert name not in new
    top = {name.split(".")[0] for name in new}
    assert top - set(sys.stdlib_module_names) == {"graceful"}


def test_import_graceful_loads_at_most_ten_of_its_own_modules() -> None:
    """Each module costs ~0.2 ms of import machinery whatever it holds: one concept a file,
    and no more files on the import path than concepts."""
    code = "import sys, graceful; print(' '.join(m for m in sys.modules if m.split('.')[0] == 'graceful'))"
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    own = result.stdout.split()
    assert len(own) <= 10, own


def test_import_graceful_reads_no_environment_variable() -> None:
    """A test runner, a linter or a docs build importing graceful never fails on a deployment
    variable: every GRACEFUL_* value, however wrong, leaves ``import graceful`` alone."""
    bad = dict.fromkeys(
        (
            "GRACEFUL_FORCE_QUIT",
            "GRACEFUL_DRAIN_DELAY",
            "GRACEFUL_PROBE_PORT",
            "GRACEFUL_PROBE_HOST",
            "GRACEFUL_TERMINATION_GRACE",
            "GRACEFUL_TIMEOUT_STOP_SEC",
        ),
        "abc",
    )
    code = (
        "import os, graceful, graceful.readiness, graceful.systemd, graceful.testing, graceful.lowlevel\n"
        "seen = [name for name in os.environ if name.startswith('GRACEFUL_')]\n"
        "print(len(seen), graceful.status().force_quit)"
    )
    result = run_python(code, env=bad)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(bad)), "25.0"]


LAZY = (
    "adapters",
    "arq",
    "asgi",
    "celery",
    "dramatiq",
    "gunicorn",
    "iteration",
    "lowlevel",
    "readiness",
    "systemd",
    "testing",
)
"""The modules reachable as attributes after a plain ``import graceful``."""


def test_public_face_is_exactly_all() -> None:
    # Public submodules (graceful.systemd, graceful.pytest_plugin, ...) show up once imported,
    # and the lazy ones once used: modules, never among __all__'s objects.
    for name in LAZY:
        assert isinstance(getattr(graceful, name), types.ModuleType), name
    public = {
        name
        for name in dir(graceful)
        if not name.startswith("_") and not isinstance(getattr(graceful, name), types.ModuleType)
    }
    assert public == set(graceful.__all__)
    assert not set(LAZY) & set(graceful.__all__)
    assert graceful.Lifecycle.__module__ == "graceful"
    assert graceful.Waiter.__module__ == "graceful"


def test_the_hosts_and_integrations_are_attributes_after_a_plain_import() -> None:
    """``graceful.asgi.lifespan(app)`` after only ``import graceful`` (the docs' snippets): each
    module is imported on first use, not by ``import graceful``; an unknown name still fails."""
    code = (
        "import sys, graceful\n"
        f"lazy = {LAZY!r}\n"
        "print(sorted(n for n in lazy if f'graceful.{n}' in sys.modules))\n"
        "app = graceful.asgi.lifespan(lambda scope, receive, send: None)\n"
        "print(type(app).__name__, [getattr(graceful, n).__name__ for n in lazy])\n"
        "try:\n"
        "    graceful.asgii\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    before, modules, unknown = result.stdout.splitlines()
    assert before == "[]"
    assert modules == f"GracefulLifespan {[f'graceful.{n}' for n in LAZY]!r}"
    assert unknown == "module 'graceful' has no attribute 'asgii'"
