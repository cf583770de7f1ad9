"""The distribution's metadata: a name of its own, the version in one place, the license shipped.

The import name is ``graceful``; the distribution is ``graceful-lifecycle`` because ``graceful``
on PyPI is another project. What a build puts in the wheel and the sdist is checked by .ci/run
(it builds them); these read the sources that decide it.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import graceful

from .conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # coverage[toml], in the test extra, brings tomli on 3.10
    import tomli as tomllib

NAME = "graceful-lifecycle"


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_distribution_has_a_name_of_its_own_and_extras_refer_to_it() -> None:
    """The name is not PyPI's other `graceful`, and the extras that pull extras use the real name."""
    project = pyproject()["project"]
    assert project["name"] == NAME
    extras = project["optional-dependencies"]
    internal = [
        req for reqs in extras.values() for req in reqs if re.match(r"graceful(\[|[<>=!~;\s]|$)", req)
    ]
    assert internal == []  # `graceful[...]` would install the other project
    assert f"{NAME}[all,docs]" in extras["test"]


def test_the_version_lives_in_one_place() -> None:
    """hatch reads graceful/__init__.py, and graceful.__version__ is that version (PEP 440)."""
    config = pyproject()
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["hatch"]["version"]["path"] == "graceful/__init__.py"
    written = re.findall(r'^__version__ = "(.+)"$', (ROOT / "graceful" / "__init__.py").read_text(), re.M)
    assert written == [graceful.__version__]
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", graceful.__version__)


def test_the_license_is_shipped_and_the_project_links_are_there() -> None:
    """MIT in LICENSE, named in the metadata; docs, changelog and issues links."""
    project = pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 The graceful developers" in text
    assert {"Documentation", "Changelog", "Issues"} <= set(project["urls"])
    sdist = pyproject()["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    assert "/LICENSE" in sdist
    assert not [path for path in sdist if path.lstrip("/").startswith(("tests", "benchmarks", "docs"))]


def test_install_lines_use_the_distribution_name() -> None:
    """No `python -m pip install` line in README, docs or examples installs `graceful` (the other project).

    Every install command is written `python -m pip install ...`; the plain `pip install graceful`
    appears only where the docs warn against it.
    """
    pages = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("*")]
    wrong = [
        f"{page.relative_to(ROOT)}: {line.strip()}"
        for page in pages
        if page.is_file()
        for line in page.read_text().splitlines()
        if re.search(r"python -m pip install[^`#]*['\" ]graceful(\[|['\" `]|$)", line)
    ]
    assert wrong == []
