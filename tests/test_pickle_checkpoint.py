"""A pickle payload planted in a ``pretrained_dir`` (issue 11): refused as a CheckpointError naming the file.

Attack: replace a user's downloaded transformers checkpoint with a ``pytorch_model.bin`` whose
pickle calls ``open`` when loaded. torch's weights-only loader blocks it, but the error used to
escape as a bare ``UnpicklingError`` that no caller expects (a traceback, not a clear refusal).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serforget.common.checkpoint import CheckpointError
from serforget.common.labels import FOUR_CLASS
from serforget.common.models import build_model
from serforget.common.models.hf import build_hf_model, tiny_hf_config


class _Payload:
    """Unpickling this creates ``marker``: proof the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("arch", ["wav2vec2", "hubert"])
def test_pickle_payload_in_pretrained_dir_is_a_checkpoint_error(tmp_path: Path, arch: str) -> None:
    clean = build_hf_model(arch=arch, labels=FOUR_CLASS, config={"hf_config": tiny_hf_config(arch=arch, n_labels=4)})
    directory = tmp_path / "downloaded"
    clean.backbone.save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"weights": _Payload(marker)}, directory / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match=r"downloaded: pytorch_model.bin holds a pickle payload"):
        build_model(arch=arch, labels=FOUR_CLASS, config={"pretrained_dir": str(directory)})
    assert not marker.exists()
