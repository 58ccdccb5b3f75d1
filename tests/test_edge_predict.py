"""Tests for edge inference: torch-free audio and windows, predictions, model resolution, CLI over HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serforget.cli import main
from serforget.common.audio import fix_length, load_audio
from serforget.common.edge.predict import predict_file, predict_files, resolve_model_file
from serforget.common.edge.runtime import EdgeAudioError, EdgeModelError, OnnxModel, read_audio, resample, split_windows
from serforget.common.keys import save_public_key
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import read_manifest
from serforget.common.release import ReleaseRegistry

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Runs a snippet in a fresh interpreter where importing torch (or torchaudio/transformers) fails,
#: as on an edge device without them, then reports which of them got imported anyway.
_WITHOUT_TORCH = """
import json, sys
for name in ("torch", "torchaudio", "transformers"):
    sys.modules[name] = None  # `import torch` now raises ImportError
{body}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchaudio", "transformers") and sys.modules[m] is not None)
sys.stderr.write("\\nLOADED=" + json.dumps(loaded) + "\\n")
"""


def _run_without_torch(body: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH.format(body=body), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


@pytest.fixture(scope="module")
def corpus(espeak_corpus: Path) -> Path:
    return espeak_corpus


@pytest.fixture(scope="module")
def cnn(release_export) -> torch.nn.Module:
    """The model the shared release was exported from."""
    return release_export.model


@pytest.fixture(scope="module")
def release_files(release_export) -> dict[str, Path]:
    """What the server publishes: checkpoint files plus model.onnx, model.int8.onnx, onnx_report.json."""
    return {**{p.name: p for p in release_export.checkpoint.iterdir()}, **release_export.files}


@pytest.fixture(scope="module")
def onnx_model(release_files: dict[str, Path]) -> OnnxModel:
    return OnnxModel(release_files["model.onnx"])


@pytest.fixture
def wav(tmp_path: Path):
    def write(name: str, seconds: float, *, rate: int = 16_000, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        t = np.arange(int(seconds * rate)) / rate
        wave = (
            0.3 * np.sin(2 * np.pi * (180 + 60 * np.sin(2 * np.pi * 0.7 * t)) * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
        )
        path = tmp_path / name
        sf.write(str(path), (wave + 0.01 * rng.standard_normal(t.size)).astype(np.float32), rate, subtype="PCM_16")
        return path

    return write


# --------------------------------------------------------------------------- audio and windows


@pytest.mark.parametrize(("orig", "new"), [(44_100, 16_000), (22_050, 16_000), (8_000, 16_000), (48_000, 16_000)])
def test_numpy_resampler_equals_torchaudio(orig: int, new: int) -> None:
    signal = np.random.default_rng(0).standard_normal(orig + 123).astype(np.float32) * 0.3
    expected = AF.resample(torch.from_numpy(signal), orig_freq=orig, new_freq=new).numpy()
    np.testing.assert_allclose(resample(signal, orig_rate=orig, new_rate=new), expected, rtol=0, atol=1e-4)


def test_edge_audio_equals_training_audio_for_a_resampled_stereo_file(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    rng = np.random.default_rng(1)
    sf.write(str(path), (0.2 * rng.standard_normal((22_050, 2))).astype(np.float32), 22_050, subtype="FLOAT")
    np.testing.assert_allclose(read_audio(path, sample_rate=16_000), load_audio(path).numpy(), rtol=0, atol=1e-4)


def test_split_windows_pads_short_and_covers_the_end_of_long_signals() -> None:
    short = split_windows(np.ones(5, np.float32), window=8, hop=4)
    assert short.shape == (1, 8) and short[0, 5:].tolist() == [0, 0, 0]
    assert split_windows(np.arange(8.0), window=8, hop=4).shape == (1, 8)
    long = split_windows(np.arange(19.0), window=8, hop=4)
    assert [w[0] for w in long] == [0, 4, 8, 11]  # last window flush with the end
    assert long[-1, -1] == 18
    with pytest.raises(ValueError, match="positive"):
        split_windows(np.ones(4), window=8, hop=0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "audio file not found"),
        (lambda p: (p.write_text("not audio"), p)[1], "not a readable audio file"),
        (lambda p: (sf.write(str(p), np.zeros((0, 1), np.float32), 16_000), p)[1], "holds no samples"),
        (lambda p: (sf.write(str(p), np.array([0.1, np.nan], np.float32), 16_000, subtype="FLOAT"), p)[1], "NaN"),
    ],
)
def test_bad_audio_is_refused_naming_the_file(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path / "bad.wav")
    with pytest.raises(EdgeAudioError, match=f"bad.wav.*{message}"):
        read_audio(path, sample_rate=16_000)


# --------------------------------------------------------------------------- predictions


def test_short_file_prediction_equals_pytorch_on_the_training_clip(cnn, onnx_model: OnnxModel, corpus: Path) -> None:
    utterance = read_manifest(corpus)[0]  # espeak speech at 22.05 kHz, shorter than the 3 s window
    prediction = predict_file(onnx_model, utterance.path)
    with torch.no_grad():
        expected = torch.softmax(cnn(fix_length(load_audio(utterance.path), 48_000)[None]), dim=-1)[0].numpy()
    assert prediction.n_windows == 1
    np.testing.assert_allclose(list(prediction.probabilities.values()), expected, rtol=0, atol=1e-4)
    assert prediction.label == FOUR_CLASS[int(expected.argmax())]
    assert prediction.latency_ms >= prediction.inference_ms > 0


def test_long_file_averages_window_probabilities(cnn, onnx_model: OnnxModel, wav) -> None:
    path = wav("long.wav", 10.0)
    prediction = predict_file(onnx_model, path)
    wave = load_audio(path)
    starts = [0, 24_000, 48_000, 72_000, 96_000, 112_000]  # 3 s windows, 1.5 s hop, last flush with the end
    with torch.no_grad():
        per_window = torch.softmax(cnn(torch.stack([wave[s : s + 48_000] for s in starts])), dim=-1).numpy()
    assert prediction.n_windows == len(starts) and prediction.duration_s == pytest.approx(10.0)
    np.testing.assert_allclose(list(prediction.probabilities.values()), per_window.mean(axis=0), rtol=0, atol=1e-4)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("hop_seconds", [0.0, -1.0, 3.5])
def test_hop_must_lie_within_the_window(onnx_model: OnnxModel, wav, hop_seconds: float) -> None:
    with pytest.raises(ValueError, match="hop_seconds must be positive and at most the 3 s window"):
        predict_file(onnx_model, wav("a.wav", 5.0), hop_seconds=hop_seconds)


def test_model_resolution_of_files_release_folders_and_precisions(
    release_files: dict[str, Path], tmp_path: Path
) -> None:
    folder = release_files["model.onnx"].parent
    assert resolve_model_file(folder) == folder / "model.onnx"
    assert resolve_model_file(folder, precision="int8") == folder / "model.int8.onnx"
    assert resolve_model_file(folder / "model.onnx") == folder / "model.onnx"
    (tmp_path / "model.onnx").write_bytes(release_files["model.onnx"].read_bytes())
    with pytest.raises(EdgeModelError, match="has no model.int8.onnx.*UA drop"):
        resolve_model_file(tmp_path, precision="int8")
    with pytest.raises(EdgeModelError, match="no such model"):
        resolve_model_file(tmp_path / "missing")


def test_int8_release_model_runs_and_reports_its_precision(release_files: dict[str, Path], wav) -> None:
    run = predict_files(
        model=release_files["model.onnx"].parent, files=[wav("a.wav", 1.0)], precision="int8", threads=1
    )
    out = run.to_dict()
    assert out["model"]["precision"] == "int8" and out["model"]["release_version"] == 3
    assert out["predictions"][0]["label"] in FOUR_CLASS


def test_onnx_file_without_serforget_metadata_is_refused(release_files: dict[str, Path], tmp_path: Path) -> None:
    proto = onnx.load(str(release_files["model.onnx"]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(EdgeModelError, match="plain.onnx: not a serforget ONNX model"):
        OnnxModel(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(EdgeModelError, match="junk.onnx: ONNX Runtime cannot load"):
        OnnxModel(tmp_path / "junk.onnx")


def test_predict_path_runs_where_torch_cannot_be_imported(release_files: dict[str, Path], wav) -> None:
    body = (
        "from serforget.common.edge.predict import predict_files\n"
        "run = predict_files(model=sys.argv[1], files=sys.argv[2:])\n"
        "print(json.dumps(run.to_dict()))"
    )
    result = _run_without_torch(body, str(release_files["model.onnx"]), str(wav("a.wav", 4.0)))
    assert result.returncode == 0, result.stderr
    assert "LOADED=[]" in result.stderr
    assert json.loads(result.stdout)["predictions"][0]["n_windows"] == 2


def test_cli_predict_imports_no_torch(release_files: dict[str, Path], wav) -> None:
    """The ``serforget edge predict`` command itself, not only the library, must run without torch."""
    body = "from serforget.cli import main\ncode = main(sys.argv[1:])"
    result = _run_without_torch(
        body, "edge", "predict", "--model", str(release_files["model.onnx"]), str(wav("a.wav", 1.0))
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED=[]" in result.stderr


def test_cli_predict_errors_name_the_file(
    release_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["edge", "predict", "--model", str(release_files["model.onnx"]), str(tmp_path / "nothing.wav")])
    assert code == 2
    assert "nothing.wav: audio file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- pull over HTTP, end to end


def _serforget(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def served_registry(tmp_path: Path) -> Iterator[tuple[ReleaseRegistry, str]]:
    """``serforget server serve-releases`` on an ephemeral port, as its own process."""
    registry = ReleaseRegistry(tmp_path / "registry")
    registry.root.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "serforget", "server", "serve-releases", "--root", str(registry.root), "--port", "0"],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        banner = process.stderr.readline()
        match = re.search(r"(http://[\d.]+:\d+)/", banner)
        assert match, f"no URL in the server banner {banner!r}"
        yield registry, match.group(1)
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()


def test_pull_over_http_then_predict_refuses_tampered_and_revoked_releases(
    served_registry: tuple[ReleaseRegistry, str],
    release_files: dict[str, Path],
    wav,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    registry, url = served_registry
    key = Ed25519PrivateKey.generate()
    server_pub = save_public_key(tmp_path / "serforget.server.pub", key.public_key())
    device = tmp_path / "device"
    audio = wav("speech.wav", 2.0)
    pull = ("edge", "pull", "--from", url, "--to", str(device), "--server-key", str(server_pub))
    predict = ("edge", "predict", "--model", str(device), str(audio))

    registry.publish(files=release_files, signing_key=key, parent=None)
    code, out, err = _serforget(capsys, *pull)
    assert code == 0, err
    assert json.loads(out)["version"] == 1
    code, out, err = _serforget(capsys, *predict)
    assert code == 0, err
    output = json.loads(out)
    assert output["model"]["path"] == str(device / "releases" / "v0001" / "model.onnx")
    assert output["predictions"][0]["label"] in FOUR_CLASS

    manifest = registry.publish(files=release_files, signing_key=key, parent=1)
    onnx_file = registry.path(manifest.version) / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\x00")  # tampered on the server after signing
    code, _, err = _serforget(capsys, *pull)
    assert code == 2 and "model.onnx" in err
    assert _serforget(capsys, *predict)[0] == 0  # v1 is still installed and runs

    registry.revoke(versions=[1, 2], reason="applies deletion request r-1", signing_key=key)
    code, _, err = _serforget(capsys, *pull)
    assert code == 2 and "revoked" in err
    assert not (device / "releases" / "v0001").exists()  # the revoked copy still encodes deleted audio
    code, _, err = _serforget(capsys, *predict)
    assert code == 2 and "no release is installed" in err
