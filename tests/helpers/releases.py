"""Releases as an earlier serforget wrote them: manifest format 1 (request list ``applies_requests``)."""

from __future__ import annotations

from typing import Any

import pytest

from serforget.common import release as release_mod


class _FormatOneManifest(release_mod.ReleaseManifest):
    """A manifest that is written in format 1 unless told otherwise (what the old writer did)."""

    def __init__(self, **fields: Any) -> None:
        fields.setdefault("format_version", 1)
        super().__init__(**fields)


def write_format_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``ReleaseRegistry.publish`` write format-1 manifests until the test ends (or ``undo``)."""
    monkeypatch.setattr(release_mod, "ReleaseManifest", _FormatOneManifest)
