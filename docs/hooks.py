"""mkdocs hook: the changelog page, with its links to the docs made relative to docs/.

CHANGELOG.md lives at the root of the repository, where a link to a page of the docs reads
``docs/deploys.md``: right on GitHub and in the sdist. docs/changelog.md includes it, and from
there the same page is ``deploys.md``. pymdownx.snippets includes a file as it is, so for that
one page this hook does the include itself and drops the ``docs/`` of each link.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CHANGELOG = Path(__file__).resolve().parents[1] / "CHANGELOG.md"
MARKER = '--8<-- "CHANGELOG.md"'
DOCS_LINK = re.compile(r"\]\(docs/")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Include CHANGELOG.md in docs/changelog.md, its ``](docs/`` links made ``](``."""
    if page.file.src_uri != "changelog.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/changelog.md no longer includes CHANGELOG.md with {MARKER}")
    return markdown.replace(MARKER, DOCS_LINK.sub("](", CHANGELOG.read_text(encoding="utf-8")))
