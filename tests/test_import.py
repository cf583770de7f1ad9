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


def test_public_face_is_exactly_all() -> None:
    # Public submodules (graceful.systemd, graceful.pytest_plugin, ...) show up once imported.
    public = {
        name
        for name in dir(graceful)
        if not name.startswith("_") and not isinstance(getattr(graceful, name), types.ModuleType)
    }
    assert public == set(graceful.__all__)
    assert graceful.Lifecycle.__module__ == "graceful"
    assert graceful.Waiter.__module__ == "graceful"
