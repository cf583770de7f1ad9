"""The one place the version is written: hatch reads it for the metadata, ``graceful`` re-exports it.

PEP 440: ``X.Y.Z`` for a release, ``X.Y.Z.devN`` between releases. A release changes only this
line (and moves CHANGELOG.md's ``[Unreleased]`` under the new number).
"""

__version__ = "0.1.0.dev0"
