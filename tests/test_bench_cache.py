"""The forgetting benchmark's cell cache: resumable, and never reads a different computation's cells."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_forgetting import FULL, CellCache


def test_cells_cached_before_the_penalty_rename_are_read_and_new_ones_use_the_new_fingerprint(tmp_path: Path) -> None:
    """The rename changed names only: a cell under the old fingerprint is this configuration's cell."""
    new, old = FULL.accepted_fingerprints()
    assert new != old and FULL.fingerprint() == new
    CellCache(tmp_path, old).put("n10_0", {"rows": 1})
    assert CellCache(tmp_path, new).get("n10_0") is None  # an unrelated fingerprint is never read
    cache = CellCache(tmp_path, new, also=(old,))
    assert cache.get("n10_0") == {"rows": 1}
    cache.put("n10_1", {"rows": 2})
    assert CellCache(tmp_path, new).get("n10_1") == {"rows": 2}
