import json
from pathlib import Path

import pytest
import torch

from serforget.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from serforget.common.models import build_model

LABELS = ["neutral", "happy", "angry", "sad"]


def _saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = build_model(arch="logmel_cnn", config={"channels": [8, 16], "hidden": 16}, labels=LABELS).eval()
    return model, save_checkpoint(model=model, out_dir=tmp_path / "ckpt", labels=LABELS, provenance={"note": "t"})


def test_round_trip_identical_outputs(tmp_path: Path) -> None:
    model, ckpt = _saved(tmp_path)
    loaded, meta = load_checkpoint(ckpt)
    assert meta.labels == tuple(LABELS) and meta.arch == "logmel_cnn" and meta.provenance["note"] == "t"
    x = torch.randn(2, 4000)
    assert torch.equal(model(x), loaded(x))


def test_flipped_byte_in_weights_rejected(tmp_path: Path) -> None:
    _, ckpt = _saved(tmp_path)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(ckpt)


def test_metadata_problems_rejected(tmp_path: Path) -> None:
    _, ckpt = _saved(tmp_path)
    meta_path = ckpt / "model.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "labels"}))
    with pytest.raises(CheckpointError, match="missing field"):
        load_checkpoint(ckpt)
    meta_path.write_text(json.dumps({**meta, "config": {**meta["config"], "channels": [8, 32]}}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(ckpt)
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="unsupported format_version"):
        load_checkpoint(ckpt)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="metadata not found"):
        load_checkpoint(tmp_path)
    _, ckpt = _saved(tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_checkpoint(ckpt)
