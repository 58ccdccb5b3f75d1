"""Tests for the faster edge graphs: folded-DFT front end, offline optimization, int8 candidates and the int8 rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from serforget.common.edge.runtime import OnnxModel
from serforget.common.labels import FOUR_CLASS
from serforget.common.models.cnn import CNNConfig, LogMelCNN
from serforget.common.models.frontend import LogMel
from serforget.common.onnx_export import (
    INT8_FILE,
    EvalSet,
    build_candidate,
    calibration_waves_from_manifest,
    eval_set_from_manifest,
    export_onnx,
    onnx_ua,
    parity_waves_from_manifest,
    quantize_int8,
)
from serforget.common.onnx_graph import FoldedDftLogMel, use_folded_dft
from serforget.common.onnx_quant import CANDIDATES, Candidate, Timing, choose_int8, front_end_nodes, interleaved_timings


@pytest.fixture(scope="module")
def corpus(espeak_corpus: Path) -> Path:
    return espeak_corpus


@pytest.fixture(scope="module")
def small_cnn() -> LogMelCNN:
    torch.manual_seed(0)
    return LogMelCNN(n_classes=4, config=CNNConfig(channels=(8, 16))).eval()


@pytest.fixture(scope="module")
def exported(small_cnn: LogMelCNN, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The release fp32 file, the raw graph it came from, and every int8 candidate built from it."""
    folder = tmp_path_factory.mktemp("speed")
    waves = parity_waves_from_manifest(manifest=corpus, labels=FOUR_CLASS, max_utterances=4)
    report = export_onnx(
        model=small_cnn,
        labels=FOUR_CLASS,
        out_path=folder / "model.onnx",
        release_version=3,
        parity_waves=waves,
        raw_out_path=folder / "raw.onnx",
    )
    paths = {"fp32": report.path, "raw": folder / "raw.onnx"}
    calibration = calibration_waves_from_manifest(
        manifest=corpus, labels=FOUR_CLASS, clip_seconds=3.0, max_utterances=8
    )
    for name in CANDIDATES:
        paths[name] = folder / f"{name}.onnx"
        build_candidate(
            name=name, source=paths["raw"], out=paths[name], calibration=calibration, info=OnnxModel(report.path).info
        )
    return paths


# --------------------------------------------------------------------------- folded DFT front end


@pytest.mark.parametrize("samples", [400, 401, 12_345, 16_000, 48_000])
def test_folded_dft_front_end_equals_the_conv_dft_front_end(samples: int) -> None:
    frontend = LogMel(n_mels=40)
    waves = 0.1 * torch.randn(3, samples, generator=torch.Generator().manual_seed(samples))
    with torch.no_grad():
        expected, got = frontend(waves), FoldedDftLogMel(frontend)(waves)
        power_expected, power_got = frontend.power_mel(waves), FoldedDftLogMel(frontend).power_mel(waves)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(power_got, power_expected, rtol=1e-4, atol=1e-9 * float(power_expected.abs().max()))


def test_folded_dft_has_half_the_products_and_refuses_odd_or_asymmetric_kernels() -> None:
    frontend = LogMel(n_fft=400)
    folded = FoldedDftLogMel(frontend)
    assert folded.cos_fold.numel() + folded.sin_fold.numel() < 0.51 * frontend.dft_kernels.numel()
    with pytest.raises(ValueError, match="even n_fft"):
        FoldedDftLogMel(LogMel(n_fft=401))
    broken = LogMel(n_fft=400)
    broken.dft_kernels[3, 0, 10] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        FoldedDftLogMel(broken)


def test_use_folded_dft_swaps_only_the_export_copy(small_cnn: LogMelCNN) -> None:
    import copy

    clone = copy.deepcopy(small_cnn)
    assert use_folded_dft(clone) == 1
    assert isinstance(clone.frontend, FoldedDftLogMel) and isinstance(small_cnn.frontend, LogMel)


# --------------------------------------------------------------------------- fp32 export steps


@pytest.mark.parametrize(("fold", "optimize"), [(False, False), (True, False), (False, True), (True, True)])
def test_every_fp32_export_step_keeps_tight_parity(
    small_cnn: LogMelCNN, corpus: Path, tmp_path: Path, fold: bool, optimize: bool
) -> None:
    waves = parity_waves_from_manifest(manifest=corpus, labels=FOUR_CLASS, max_utterances=4)
    report = export_onnx(
        model=small_cnn,
        labels=FOUR_CLASS,
        out_path=tmp_path / "m.onnx",
        release_version=1,
        parity_waves=waves,
        fold_dft=fold,
        optimize=optimize,
        raw_out_path=tmp_path / "raw.onnx",
    )
    assert report.parity.passed and report.parity.max_abs_logit_diff < 2e-5
    assert report.front_end == ("folded-dft" if fold else "conv-dft")
    assert report.optimization == ("ort-extended" if optimize else "none")
    assert report.raw_size_bytes == (tmp_path / "raw.onnx").stat().st_size
    proto = onnx.load(str(report.path))
    assert {p.key: p.value for p in proto.metadata_props}["release_version"] == "1"  # metadata survives the optimizer
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", "samples"]
    if optimize:
        assert len(proto.graph.node) <= len(onnx.load(str(tmp_path / "raw.onnx")).graph.node)


# --------------------------------------------------------------------------- int8 candidates


@pytest.mark.parametrize("name", CANDIDATES)
def test_each_int8_candidate_tracks_fp32_and_keeps_the_front_end_in_float(
    exported: dict[str, Path], corpus: Path, name: str
) -> None:
    data = eval_set_from_manifest(manifest=corpus, labels=FOUR_CLASS, clip_seconds=3.0)
    fp32, int8 = OnnxModel(exported["fp32"]), OnnxModel(exported[name])
    assert int8.info.precision == "int8" and int8.info.release_version == 3
    assert int8.session.get_modelmeta().custom_metadata_map["quantization"] == name
    ref, got = fp32.run(data.waves)[0], int8.run(data.waves)[0]
    # stated tolerance: int8 changes at most 1 in 8 decisions of this untrained model, and logits by < 0.5
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.875
    assert np.abs(ref - got).max() < 0.5
    assert abs(onnx_ua(fp32, data) - onnx_ua(int8, data)) <= 0.125
    proto = onnx.load(str(exported[name]))
    stored = {i.name: i.data_type for i in proto.graph.initializer}
    assert stored["model.frontend.cos_fold.int8"] == onnx.TensorProto.INT8  # stored int8, computed in float
    quantized_ops = {n.op_type for n in proto.graph.node if n.name in set(front_end_nodes(proto))}
    assert not quantized_ops & {"QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear"}


def test_front_end_nodes_are_the_dft_and_mel_products(exported: dict[str, Path]) -> None:
    proto = onnx.load(str(exported["raw"]))
    ops = sorted(n.op_type for n in proto.graph.node if n.name in set(front_end_nodes(proto)))
    assert ops == ["MatMul", "MatMul", "MatMul"]


# --------------------------------------------------------------------------- the release's int8 rule


def _candidate(
    name: str, *, drop: float | None = 0.2, speedup: float | None = 1.6, error: str | None = None
) -> Candidate:
    return Candidate(
        name=name,
        quantization=name.split("-")[0],
        quant_format=None,
        size_bytes=10,
        ua=0.8,
        ua_drop_points=drop,
        cpu_ms=1.0,
        speedup=speedup,
        error=error,
    )


def test_choose_int8_picks_the_fastest_candidate_within_the_bound() -> None:
    chosen, reason = choose_int8(
        [
            _candidate("static-qdq", speedup=1.3),
            _candidate("static-qoperator", speedup=1.8, drop=1.5),
            _candidate("dynamic", speedup=1.6),
        ],
        max_ua_drop=1.0,
        min_speedup=1.0,
    )
    assert chosen is not None and chosen.name == "dynamic"
    assert "1.60x fp32 speed" in reason


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        (_candidate("dynamic", drop=1.01), "UA drop 1.01 points exceeds the 1-point bound"),
        (_candidate("dynamic", speedup=0.27), "0.27x fp32 speed, below the required 1x"),
        (_candidate("dynamic", drop=None), "UA change not measured"),
        (_candidate("dynamic", speedup=None), "latency not measured"),
        (_candidate("static-qdq", error="boom"), "not built (boom)"),
    ],
)
def test_choose_int8_refuses_slower_less_accurate_or_unmeasured_candidates(candidate: Candidate, message: str) -> None:
    chosen, reason = choose_int8([candidate], max_ua_drop=1.0, min_speedup=1.0)
    assert chosen is None
    assert reason.startswith("no int8 candidate is both within the UA bound and faster than fp32") and message in reason


def test_choose_int8_accepts_a_drop_exactly_at_the_bound_and_rejects_bad_settings() -> None:
    chosen, _ = choose_int8([_candidate("dynamic", drop=1.0, speedup=1.0)], max_ua_drop=1.0, min_speedup=1.0)
    assert chosen is not None
    with pytest.raises(ValueError, match="min_speedup"):
        choose_int8([], max_ua_drop=1.0, min_speedup=0.0)
    with pytest.raises(ValueError, match="max_ua_drop"):
        choose_int8([], max_ua_drop=float("nan"), min_speedup=1.0)


# fp32 takes 10 ms: the default rule wants int8 at >= 1.1x, so equal speed is not enough
@pytest.mark.parametrize(("int8_cpu_ms", "published"), [(5.0, True), (9.0, True), (10.0, False), (12.0, False)])
def test_quantize_int8_publishes_only_a_candidate_faster_than_fp32(
    exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, int8_cpu_ms: float, published: bool
) -> None:
    monkeypatch.setattr("serforget.common.onnx_export.onnx_ua", lambda model, data, **_: 0.8)
    monkeypatch.setattr(
        "serforget.common.onnx_export.interleaved_timings",
        lambda runners, **_: {
            name: Timing(wall_ms=1.0, cpu_ms=10.0 if name == "fp32" else int8_cpu_ms, wall_min_ms=1.0, n_calls=1)
            for name in runners
        },
    )
    data = EvalSet(waves=np.zeros((2, 16_000), np.float32), targets=np.array([0, 1]), labels=FOUR_CLASS)
    out = tmp_path / INT8_FILE
    report = quantize_int8(
        fp32_path=exported["fp32"],
        source_path=exported["raw"],
        out_path=out,
        eval_set=data,
        candidates=["dynamic"],
        calibration=None,
    )
    assert report.published is published and out.is_file() is published
    assert report.speedup == pytest.approx(10.0 / int8_cpu_ms)
    assert ("faster" in report.reason) if not published else report.reason.startswith("dynamic:")
    assert [p.name for p in tmp_path.iterdir()] == ([INT8_FILE] if published else [])
    assert json.loads(json.dumps(report.to_dict()))["candidates"][0]["name"] == "dynamic"


def test_interleaved_timings_alternate_runners_in_rounds() -> None:
    calls: list[str] = []
    timings = interleaved_timings(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, calls=2, warmup=1
    )
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert timings["a"].n_calls == 4 and timings["b"].cpu_ms >= 0.0
    with pytest.raises(ValueError, match="rounds"):
        interleaved_timings({}, rounds=0)


# --------------------------------------------------------------------------- edge runtime without torch


def test_edge_runtime_runs_the_optimized_and_int8_models_without_torch(exported: dict[str, Path]) -> None:
    """A fresh interpreter in which importing torch fails loads and runs the published files."""
    script = (
        "import sys, json\n"
        "sys.modules['torch'] = None  # any import of torch now raises\n"
        "import numpy as np\n"
        "from common.edge.runtime import OnnxModel\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    logits, probs = OnnxModel(path, threads=1).run(np.zeros((2, 16000), np.float32))\n"
        "    out[path] = [list(logits.shape), float(probs.sum())]\n"
        "print(json.dumps(out))\n"
    )
    paths = [str(exported["fp32"]), str(exported["static-qdq"]), str(exported["dynamic"])]
    done = subprocess.run(
        [sys.executable, "-c", script, *paths],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for path in paths:
        assert result[path][0] == [2, 4] and result[path][1] == pytest.approx(2.0, abs=1e-4)


# --------------------------------------------------------------------------- a transformers backbone


@pytest.mark.slow
def test_tiny_wav2vec2_exports_optimized_fp32_and_int8_candidates_that_track_it(tmp_path: Path) -> None:
    """Issue 12's path for transformers: fp32 (parity-gated, optimized) and every int8 candidate."""
    from serforget.common.models import build_model
    from serforget.common.models.hf import tiny_hf_config
    from serforget.common.onnx_export import probe_waves

    torch.manual_seed(0)
    model = build_model(
        arch="wav2vec2", config={"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=4)}, labels=FOUR_CLASS
    ).eval()
    report = export_onnx(
        model=model,
        labels=FOUR_CLASS,
        out_path=tmp_path / "model.onnx",
        release_version=1,
        parity_waves=probe_waves(seconds=(1.0, 3.0), per_length=3),
        raw_out_path=tmp_path / "raw.onnx",
    )
    assert report.parity.passed and report.front_end == "none" and report.optimization == "ort-extended"
    waves = np.stack([w.numpy() for w in probe_waves(seconds=(3.0,), per_length=8)])
    reference = OnnxModel(report.path).run(waves)[0]
    for name in CANDIDATES:
        out = tmp_path / f"{name}.onnx"
        build_candidate(
            name=name,
            source=tmp_path / "raw.onnx",
            out=out,
            calibration=list(waves[:4]),
            info=OnnxModel(report.path).info,
        )
        logits = OnnxModel(out).run(waves)[0]
        # dynamic leaves the (here dominant) convolutions in fp32; static quantizes them too
        assert out.stat().st_size < (0.6 if name.startswith("static") else 1.0) * report.size_bytes, name
        assert np.abs(logits - reference).max() < 0.1, name  # stated tolerance for a random tiny model's logits
