"""Tests for the server-side ONNX export: graph contract, metadata, parity gate, int8 gate, release files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from serforget.cli import main
from serforget.common.checkpoint import load_checkpoint, save_checkpoint
from serforget.common.edge.runtime import METADATA_KEYS, OnnxModel, parse_model_info
from serforget.common.fsutil import sha256_file
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import read_manifest
from serforget.common.models import build_model
from serforget.common.models.cnn import CNNConfig, LogMelCNN
from serforget.common.models.hf import tiny_hf_config
from serforget.common.onnx_export import (
    INT8_FILE,
    PARITY_BATCH_SIZES,
    PARITY_SECONDS,
    REPORT_FILE,
    EvalSet,
    OnnxExportError,
    ParityError,
    _StableGroupNorm,
    eval_set_from_manifest,
    export_onnx,
    parity_waves_from_manifest,
    probe_waves,
    quantize_int8,
)


@pytest.fixture(scope="module")
def corpus(espeak_corpus: Path) -> Path:
    return espeak_corpus


@pytest.fixture(scope="module")
def cnn() -> LogMelCNN:
    torch.manual_seed(0)
    return build_model(arch="logmel_cnn", config={}, labels=FOUR_CLASS).eval()


@pytest.fixture(scope="module")
def cnn_export(cnn: LogMelCNN, corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    waves = parity_waves_from_manifest(manifest=corpus, labels=FOUR_CLASS)
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_onnx(
        model=cnn,
        labels=FOUR_CLASS,
        out_path=out,
        release_version=7,
        parity_waves=waves,
        parity_source="espeak",
        raw_out_path=out.with_name("raw.onnx"),
    )


def _raw(export) -> Path:
    """The exporter's graph before ONNX Runtime's offline optimization: what the quantizer reads."""
    return export.path.with_name("raw.onnx")


def test_graph_takes_dynamic_waveform_batches_and_passes_checker(cnn_export) -> None:
    proto = onnx.load(str(cnn_export.path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    (waveform,) = proto.graph.input
    assert waveform.name == "waveform"
    assert waveform.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param for d in waveform.type.tensor_type.shape.dim] == ["batch", "samples"]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    assert not any(node.metadata_props for node in proto.graph.node)  # no exporter stack traces shipped
    assert b"onnx_export.py" not in cnn_export.path.read_bytes()


def test_metadata_carries_labels_rate_release_and_weights_hash(cnn: LogMelCNN, cnn_export, tmp_path: Path) -> None:
    meta = {p.key: p.value for p in onnx.load(str(cnn_export.path)).metadata_props}
    assert set(METADATA_KEYS) <= set(meta)
    info = parse_model_info(meta, source="test")
    assert info.labels == FOUR_CLASS
    assert (info.sample_rate, info.release_version, info.arch, info.precision) == (16_000, 7, "logmel_cnn", "fp32")
    saved_meta = load_checkpoint(save_checkpoint(model=cnn, out_dir=tmp_path / "ckpt", labels=FOUR_CLASS))[1]
    assert info.weights_sha256 == saved_meta.weights_sha256


def test_parity_report_covers_lengths_and_batch_sizes_within_bound(cnn_export) -> None:
    parity = cnn_export.parity
    assert parity.passed and parity.source == "espeak"
    assert parity.lengths_s == list(PARITY_SECONDS)
    assert parity.batch_sizes == list(PARITY_BATCH_SIZES)
    assert parity.max_abs_logit_diff <= 1e-4
    assert parity.argmax_agreement >= 0.999
    assert parity.n_examples == 16 * len(PARITY_SECONDS)


def test_unseen_batch_and_length_match_pytorch_and_reference_evaluator(cnn: LogMelCNN, cnn_export) -> None:
    waves = 0.1 * torch.randn(5, 12_345, generator=torch.Generator().manual_seed(1))
    logits, probabilities = OnnxModel(cnn_export.path).run(waves.numpy())
    with torch.no_grad():
        expected = cnn(waves).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    short = waves[:2, :4_000].numpy()
    # the reference evaluator knows only standard ONNX ops, so it checks the exporter's graph (the
    # published file adds ONNX Runtime's fused operators and is parity-checked against PyTorch instead)
    reference_logits, _ = ReferenceEvaluator(str(_raw(cnn_export))).run(None, {"waveform": short})
    np.testing.assert_allclose(reference_logits, OnnxModel(cnn_export.path).run(short)[0], rtol=0, atol=1e-4)


def _short_waves(n: int = 3) -> list[torch.Tensor]:
    return list(0.1 * torch.randn(n, 8_000, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("arch", ["wav2vec2", "hubert"])
def test_transformers_family_exports_with_parity_and_leaves_the_model_untouched(
    arch: str, corpus: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build_model(
        arch=arch, config={"hf_config": tiny_hf_config(arch=arch, n_labels=4)}, labels=FOUR_CLASS
    ).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    waves = parity_waves_from_manifest(manifest=corpus, labels=FOUR_CLASS, max_utterances=2)
    report = export_onnx(
        model=model, labels=FOUR_CLASS, out_path=tmp_path / "m.onnx", release_version=None, parity_waves=waves
    )
    assert report.parity.passed and report.parity.max_abs_logit_diff <= 1e-4
    assert report.parity.lengths_s == list(PARITY_SECONDS)
    assert report.metadata["arch"] == arch and report.metadata["release_version"] == ""
    assert model.training  # exported from an eval-mode copy; the caller's module is not switched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dims = onnx.load(str(report.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "samples"]


@pytest.mark.parametrize(
    ("shape", "groups", "affine"), [((2, 16, 40, 70), 4, True), ((3, 8, 250), 8, True), ((1, 6, 5, 9), 3, False)]
)
def test_stable_group_norm_equals_group_norm(shape: tuple[int, ...], groups: int, affine: bool) -> None:
    norm = torch.nn.GroupNorm(groups, shape[1], affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(shape) * 0.5 - 13.8  # far from zero, like log-mel frames of silence
    with torch.no_grad():
        torch.testing.assert_close(_StableGroupNorm(norm)(x), norm(x), rtol=0, atol=1e-5)


def test_long_padded_inputs_keep_fp32_parity_through_group_norm(tmp_path: Path) -> None:
    """Zero-padded 7 s clips: ONNX Runtime's one-pass InstanceNormalization alone drifts by ~1.5e-5 here."""
    torch.manual_seed(0)
    model = LogMelCNN(n_classes=4, config=CNNConfig(channels=(16, 32))).eval()
    speech = probe_waves(seconds=(2.0,), per_length=4)
    padded = [torch.nn.functional.pad(wave, (0, 7 * 16_000 - wave.shape[0])) for wave in speech]
    report = export_onnx(
        model=model, labels=FOUR_CLASS, out_path=tmp_path / "m.onnx", release_version=1, parity_waves=padded, atol=3e-6
    )
    assert report.parity.passed and report.parity.max_abs_logit_diff < 3e-6


class _DivergesWhenExported(LogMelCNN):
    """Adds an offset only inside the exported graph: the parity check must catch it."""

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        logits = super().forward(waveform)
        return logits + 0.01 if torch.compiler.is_compiling() else logits


def test_parity_failure_raises_and_keeps_the_previous_file(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous release")
    model = _DivergesWhenExported(n_classes=4, config=CNNConfig(channels=(4, 8))).eval()
    with pytest.raises(ParityError, match=r"max \|logit diff\| 0\.01"):
        export_onnx(model=model, labels=FOUR_CLASS, out_path=out, release_version=2, parity_waves=_short_waves())
    assert out.read_bytes() == b"previous release"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 17}, "opset 17 is not supported"),
        ({"release_version": 0}, "release_version must be a positive integer"),
        ({"labels": ("neutral", "happy", "angry")}, r"shape \(2, 4\), expected \[batch, 3\]"),
        ({"labels": ("sad", "sad", "angry", "happy")}, "distinct names"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_error(
    cnn: LogMelCNN, tmp_path: Path, kwargs: dict, message: str
) -> None:
    args = {"model": cnn, "labels": FOUR_CLASS, "out_path": tmp_path / "m.onnx", "release_version": 1, **kwargs}
    with pytest.raises(OnnxExportError, match=message):
        export_onnx(**args)
    assert not (tmp_path / "m.onnx").exists()


def test_int8_model_is_smaller_and_its_ua_change_is_measured(cnn_export, corpus: Path, tmp_path: Path) -> None:
    eval_set = eval_set_from_manifest(manifest=corpus, labels=FOUR_CLASS, clip_seconds=3.0)
    out = tmp_path / INT8_FILE
    report = quantize_int8(
        fp32_path=cnn_export.path,
        source_path=_raw(cnn_export),
        out_path=out,
        eval_set=eval_set,
        max_ua_drop=100.0,
        min_speedup=1e-6,
    )
    assert report.published and out.is_file()
    assert report.size_bytes_int8 == out.stat().st_size
    sizes = {c["name"]: c["size_bytes"] for c in report.candidates}
    assert set(sizes) == {"static-qdq", "static-qoperator", "dynamic"}
    assert (
        max(sizes["static-qdq"], sizes["static-qoperator"]) <= 0.4 * report.size_bytes_fp32
    )  # front-end constants stored int8 too
    assert sizes["dynamic"] < report.size_bytes_fp32
    assert report.n_eval == len(read_manifest(corpus))
    assert report.ua_drop_points == pytest.approx(100 * (report.ua_fp32 - report.ua_int8))
    info = OnnxModel(out).info
    assert info.precision == "int8" and info.labels == FOUR_CLASS and info.release_version == 7


def _fake_ua(values: dict[str, float]):
    return lambda model, data, **_: values[model.info.precision]


@pytest.mark.parametrize(("ua_int8", "published"), [(0.795, True), (0.79, True), (0.70, False)])
def test_int8_is_published_only_within_the_ua_bound(
    cnn_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ua_int8: float, published: bool
) -> None:
    monkeypatch.setattr("serforget.common.onnx_export.onnx_ua", _fake_ua({"fp32": 0.80, "int8": ua_int8}))
    data = EvalSet(waves=np.zeros((2, 16_000), np.float32), targets=np.array([0, 1]), labels=FOUR_CLASS)
    out = tmp_path / INT8_FILE
    report = quantize_int8(
        fp32_path=cnn_export.path,
        source_path=_raw(cnn_export),
        out_path=out,
        eval_set=data,
        max_ua_drop=1.0,
        min_speedup=1e-6,
        candidates=["dynamic"],
    )
    assert report.published is published
    assert out.is_file() is published
    assert report.ua_drop_points == pytest.approx(100 * (0.80 - ua_int8))
    assert ("within" if published else "exceeds") in report.reason
    assert [p.name for p in tmp_path.iterdir()] == ([INT8_FILE] if published else [])


def test_int8_without_labelled_data_is_not_published(cnn_export, tmp_path: Path) -> None:
    report = quantize_int8(fp32_path=cnn_export.path, out_path=tmp_path / INT8_FILE, eval_set=None)
    assert not report.published and "cannot be measured" in report.reason
    assert not (tmp_path / INT8_FILE).exists()


def test_quantizing_an_int8_model_or_a_negative_bound_is_refused(cnn_export, tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match="max_ua_drop"):
        quantize_int8(fp32_path=cnn_export.path, out_path=tmp_path / "q.onnx", eval_set=None, max_ua_drop=-1.0)
    first = tmp_path / "first.onnx"
    data = EvalSet(waves=np.zeros((1, 16_000), np.float32), targets=np.array([0]), labels=FOUR_CLASS)
    quantize_int8(
        fp32_path=cnn_export.path,
        source_path=_raw(cnn_export),
        out_path=first,
        eval_set=data,
        max_ua_drop=100.0,
        min_speedup=1e-6,
        candidates=["dynamic"],
    )
    with pytest.raises(OnnxExportError, match="quantize the fp32 model"):
        quantize_int8(fp32_path=first, out_path=tmp_path / "again.onnx", eval_set=data)


def test_export_release_models_writes_reported_files(release_export) -> None:
    checkpoint, files = release_export.checkpoint, release_export.files
    assert set(files) == {"model.onnx", INT8_FILE, REPORT_FILE}
    report = json.loads(files[REPORT_FILE].read_text())
    assert (report["format"], report["format_version"], report["release_version"]) == ("serforget-onnx-report", 1, 3)
    assert report["checkpoint_weights_sha256"] == load_checkpoint(checkpoint)[1].weights_sha256
    assert report["fp32"]["parity"]["passed"] and report["fp32"]["parity"]["n_examples"] == 4 * len(PARITY_SECONDS)
    assert report["int8"]["published"] and report["int8"]["n_eval"] == 16
    assert report["int8"]["calibration_source"] == "16 clips of manifest.csv"
    assert report["fp32"]["optimization"] == "ort-extended" and report["fp32"]["front_end"] == "folded-dft"
    for name in ("model.onnx", INT8_FILE):
        assert report["files"][name]["sha256"] == sha256_file(files[name])
    session = ort.InferenceSession(str(files["model.onnx"]))
    assert session.get_modelmeta().custom_metadata_map["release_version"] == "3"


def test_cli_export_without_manifest_uses_probes_and_cannot_publish_int8(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = build_model(arch="logmel_cnn", config={"channels": [4, 8]}, labels=FOUR_CLASS)
    checkpoint = save_checkpoint(model=model, out_dir=tmp_path / "ckpt", labels=FOUR_CLASS)
    code = main(
        [
            "export-onnx",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "onnx"),
            "--int8",
            "--release-version",
            "4",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["files"]) == {"model.onnx", REPORT_FILE}
    assert summary["parity"]["source"] == "synthetic probe signals" and summary["parity"]["passed"]
    assert summary["int8"]["published"] is False and "cannot be measured" in summary["int8"]["reason"]
    assert not (tmp_path / "onnx" / INT8_FILE).exists()
    assert OnnxModel(tmp_path / "onnx" / "model.onnx").info.release_version == 4


def test_cli_export_reports_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export-onnx", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "onnx")]) == 2
    assert "nope/model.json: checkpoint metadata not found" in capsys.readouterr().err
