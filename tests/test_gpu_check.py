"""scripts/gpu_check.sh runs on a machine without CUDA too: CPU rows measured, CUDA rows skipped with a note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_tiny_writes_side_by_side_rows(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "GPU_CHECK_TINY": "1", "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["tiny"] is True and result["n_forget"] == 10
    assert [r["model"] for r in result["rows"]] == ["logmel_cnn", "wav2vec2-tiny"]
    for row in result["rows"]:
        assert row["cpu"]["train_step_s"] > 0 and row["cpu"]["unlearn_s"] > 0 and row["cpu"]["unlearn_epochs"] >= 1
        assert (row["cuda"] is not None) == torch.cuda.is_available()
    md = out.with_suffix(".md").read_text()
    assert "| model | params | step | CPU s | CUDA s | CPU / CUDA |" in md
    if not torch.cuda.is_available():
        assert result["note"].startswith("no CUDA device visible") and "skipped" in md
