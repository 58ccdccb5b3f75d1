from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from serforget.common.audio import AudioError, fix_length, load_audio, save_audio
from tests.helpers.audio import tone


def test_load_resamples_and_mixes_down(tmp_path: Path) -> None:
    stereo = np.stack([tone(440, 1.0, sr=44_100), tone(440, 1.0, sr=44_100, seed=1)], axis=1)
    sf.write(tmp_path / "st.wav", stereo, 44_100)
    wave = load_audio(tmp_path / "st.wav")
    assert wave.ndim == 1 and wave.dtype == torch.float32
    assert abs(wave.shape[0] - 16_000) <= 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable audio file"),
        (b"this is not audio at all" * 10, "not a readable audio file"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not a readable audio file"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(content)
    with pytest.raises(AudioError, match=message) as info:
        load_audio(bad)
    assert "bad.wav" in str(info.value)


def test_empty_nan_missing_and_too_long(tmp_path: Path) -> None:
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16_000)
    with pytest.raises(AudioError, match="empty.wav: audio file holds no samples"):
        load_audio(tmp_path / "empty.wav")
    nan = tone(300, 0.2)
    nan[10] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16_000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: audio contains NaN"):
        load_audio(tmp_path / "nan.wav")
    with pytest.raises(AudioError, match="missing.wav: audio file not found"):
        load_audio(tmp_path / "missing.wav")
    save_audio(tmp_path / "long.wav", tone(300, 2.0))
    with pytest.raises(AudioError, match="longer than"):
        load_audio(tmp_path / "long.wav", max_seconds=1.0)


def test_fix_length_centre_crops_and_end_pads() -> None:
    wave = torch.arange(10.0)
    assert fix_length(wave, 4).tolist() == [3.0, 4.0, 5.0, 6.0]
    padded = fix_length(wave, 12)
    assert padded[:10].tolist() == wave.tolist() and padded[10:].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        fix_length(wave, 0)
