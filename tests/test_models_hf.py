"""Tests of the wav2vec2/HuBERT wrapper on tiny configs (milliseconds per forward, no hub access)."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from transformers import Wav2Vec2FeatureExtractor

from serforget.common.labels import FOUR_CLASS
from serforget.common.models.hf import (
    HF_ARCHS,
    HF_SPEC_VERSION,
    HFSpeechClassifier,
    build_hf_model,
    min_input_samples,
    tiny_hf_config,
    zero_mean_unit_var,
)

SR = 16_000
SUPERB_LABELS = ("neu", "hap", "ang", "sad")  # label names of the SUPERB emotion checkpoints


def _tiny(arch: str, labels=FOUR_CLASS, seed: int = 0, **options) -> HFSpeechClassifier:
    torch.manual_seed(seed)
    config = {"hf_config": tiny_hf_config(arch=arch, n_labels=len(labels)), **options}
    return build_hf_model(arch=arch, labels=labels, config=config)


def _waves(batch: int, seconds: float, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, int(seconds * SR), generator=generator)


def _save_checkpoint(model: HFSpeechClassifier, directory: Path) -> Path:
    """What a user's downloaded checkpoint looks like: transformers' own save format."""
    model.backbone.save_pretrained(directory)
    return directory


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach a hub fails loudly instead of silently succeeding online."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize("seconds", [1.0, 2.5])
def test_forward_gives_one_logit_row_per_utterance(arch: str, seconds: float) -> None:
    model = _tiny(arch).eval()
    logits = model(_waves(3, seconds))
    assert logits.shape == (3, len(FOUR_CLASS))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_eval_mode_is_deterministic_and_batch_independent(arch: str) -> None:
    model = _tiny(arch).eval()
    x = _waves(3, 1.0)
    first = model(x)
    assert torch.equal(first, model(x))
    torch.testing.assert_close(model(x[1:2]), first[1:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_frozen_feature_encoder_still_passes_gradients_to_the_waveform(arch: str) -> None:
    model = _tiny(arch).train()
    x = _waves(2, 1.0).requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 3])).backward()
    backbone = model.backbone
    base = getattr(backbone, backbone.base_model_prefix)
    assert backbone.classifier.weight.grad is not None and backbone.classifier.weight.grad.abs().sum() > 0
    # layerdrop may skip a whole transformer layer in training, so ask for gradients somewhere in it
    encoder_grads = [p.grad for p in base.encoder.parameters() if p.grad is not None]
    assert encoder_grads and sum(g.abs().sum() for g in encoder_grads) > 0
    assert base.feature_projection.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in base.feature_extractor.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0  # PGD in the waveform domain needs this


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_unfrozen_feature_encoder_gets_gradients(arch: str) -> None:
    model = _tiny(arch, freeze_feature_encoder=False).train()
    torch.nn.functional.cross_entropy(model(_waves(2, 1.0)), torch.tensor([1, 2])).backward()
    base = getattr(model.backbone, model.backbone.base_model_prefix)
    conv_grads = [p.grad for p in base.feature_extractor.parameters()]
    assert all(g is not None for g in conv_grads) and sum(g.abs().sum() for g in conv_grads) > 0


def test_normalisation_matches_the_transformers_feature_extractor() -> None:
    x = _waves(2, 1.0) * torch.tensor([[0.01], [3.0]]) + 0.2
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=SR)
    expected = extractor([row.numpy() for row in x], sampling_rate=SR, return_tensors="np")["input_values"]
    np.testing.assert_allclose(zero_mean_unit_var(x).numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_normalize_waveform_applies_the_normalisation_inside_the_graph(arch: str) -> None:
    # a per-frame layer norm after a biased conv is not itself invariant to gain and offset, unlike
    # the default bias-free conv + per-channel group norm front end
    hf_config = {**tiny_hf_config(arch=arch, n_labels=4), "feat_extract_norm": "layer", "conv_bias": True}
    torch.manual_seed(0)
    normalised = build_hf_model(arch=arch, labels=FOUR_CLASS, config={"hf_config": hf_config}).eval()
    raw = build_hf_model(
        arch=arch, labels=FOUR_CLASS, config={"hf_config": hf_config, "normalize_waveform": False}
    ).eval()
    raw.load_state_dict(normalised.state_dict())
    x = _waves(2, 1.0)
    shifted = 5.0 * x + 0.3
    torch.testing.assert_close(normalised(x), raw(zero_mean_unit_var(x)))
    torch.testing.assert_close(normalised(shifted), normalised(x), rtol=1e-4, atol=1e-5)
    raw_change = (raw(shifted) - raw(x)).abs().max()
    assert raw_change > 100 * (normalised(shifted) - normalised(x)).abs().max()


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_spec_rebuilds_the_same_architecture_and_outputs(arch: str) -> None:
    model = _tiny(arch, seed=0).eval()
    spec = json.loads(json.dumps(model.spec()))  # what a checkpoint stores and reads back
    assert spec["arch"] == arch and spec["spec_version"] == HF_SPEC_VERSION
    rebuilt = build_hf_model(arch=arch, labels=FOUR_CLASS, config=spec)
    assert set(rebuilt.state_dict()) == set(model.state_dict())
    assert rebuilt.spec() == model.spec()
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    x = _waves(2, 1.0)
    assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_spec_keeps_options_and_freezing(arch: str) -> None:
    model = _tiny(arch, normalize_waveform=False, freeze_feature_encoder=False)
    rebuilt = build_hf_model(arch=arch, labels=FOUR_CLASS, config=model.spec())
    assert rebuilt.normalize_waveform is False and rebuilt.feature_encoder_frozen is False
    base = getattr(rebuilt.backbone, rebuilt.backbone.base_model_prefix)
    assert all(p.requires_grad for p in base.feature_extractor.parameters())


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_project_registry_round_trips_the_spec(arch: str) -> None:
    from serforget.common.models import build_model, model_spec

    model = build_model(arch=arch, config={"hf_config": tiny_hf_config(arch=arch, n_labels=4)}, labels=FOUR_CLASS)
    spec = json.loads(json.dumps(model_spec(model)))
    rebuilt = build_model(arch=spec["arch"], config=spec["config"], labels=FOUR_CLASS)
    assert isinstance(rebuilt, HFSpeechClassifier) and rebuilt.spec() == model.spec()


def test_rebuild_with_other_labels_is_refused() -> None:
    spec = _tiny("wav2vec2").spec()
    with pytest.raises(ValueError, match="id2label"):
        build_hf_model(arch="wav2vec2", labels=("happy", "neutral", "angry", "sad"), config=spec)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_local_checkpoint_loads_offline_and_reheads_to_our_labels(arch: str, tmp_path: Path, no_network: None) -> None:
    original = _tiny(arch, labels=("l0", "l1", "l2"), seed=3).eval()
    directory = _save_checkpoint(original, tmp_path / "user-download")
    model = build_hf_model(arch=arch, labels=FOUR_CLASS, config={"pretrained_dir": str(directory)}).eval()
    assert model.labels == FOUR_CLASS and model.head_from_checkpoint is False
    assert model.backbone.config.id2label == dict(enumerate(FOUR_CLASS))
    assert model(_waves(2, 1.0)).shape == (2, 4)
    loaded, saved = model.state_dict(), original.state_dict()
    shared = [k for k in saved if ".classifier." not in k]
    assert all(torch.equal(loaded[k], saved[k]) for k in shared)  # encoder and projector really loaded


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_trained_emotion_head_is_reused_in_our_label_order(arch: str, tmp_path: Path, no_network: None) -> None:
    superb_like = _tiny(arch, labels=SUPERB_LABELS, seed=4).eval()
    directory = _save_checkpoint(superb_like, tmp_path / "superb-er")
    ours = ("sad", "neutral", "happy")
    model = build_hf_model(arch=arch, labels=ours, config={"pretrained_dir": directory}).eval()
    assert model.head_from_checkpoint is True
    x = _waves(2, 1.0)
    torch.testing.assert_close(model(x), superb_like(x)[:, [3, 0, 1]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_headless_pretraining_checkpoint_gets_a_fresh_head(arch: str, tmp_path: Path) -> None:
    # like facebook/wav2vec2-base: encoder weights only, even if its config names emotion labels
    original = _tiny(arch, labels=SUPERB_LABELS, seed=5)
    base = getattr(original.backbone, original.backbone.base_model_prefix)
    base.save_pretrained(tmp_path / "base")
    model = build_hf_model(arch=arch, labels=FOUR_CLASS, config={"pretrained_dir": tmp_path / "base"})
    assert model.head_from_checkpoint is False
    loaded = getattr(model.backbone, model.backbone.base_model_prefix).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in base.state_dict().items())


def test_same_sized_head_with_other_labels_is_not_reused(tmp_path: Path) -> None:
    directory = _save_checkpoint(_tiny("wav2vec2", labels=("a", "b", "c", "d")), tmp_path / "other")
    model = build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config={"pretrained_dir": directory})
    assert model.head_from_checkpoint is False


def test_checkpoint_spec_rebuilds_without_the_directory(tmp_path: Path) -> None:
    directory = _save_checkpoint(_tiny("hubert", labels=SUPERB_LABELS), tmp_path / "download")
    model = build_hf_model(arch="hubert", labels=("sad", "angry"), config={"pretrained_dir": directory}).eval()
    spec = json.loads(json.dumps(model.spec()))
    assert "pretrained_dir" not in spec and str(tmp_path) not in json.dumps(spec)
    rebuilt = build_hf_model(arch="hubert", labels=("sad", "angry"), config=spec)
    rebuilt.load_state_dict(model.state_dict())
    x = _waves(2, 1.0)
    assert torch.equal(rebuilt.eval()(x), model(x))


def test_preprocessor_config_decides_normalisation_and_rate(tmp_path: Path) -> None:
    directory = _save_checkpoint(_tiny("wav2vec2"), tmp_path / "ckpt")
    preprocessor = directory / "preprocessor_config.json"
    preprocessor.write_text(json.dumps({"do_normalize": False, "sampling_rate": SR}))
    from_preprocessor = build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config={"pretrained_dir": directory})
    assert from_preprocessor.normalize_waveform is False
    explicit = {"pretrained_dir": directory, "normalize_waveform": True}
    assert build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config=explicit).normalize_waveform is True
    preprocessor.write_text(json.dumps({"do_normalize": True, "sampling_rate": 8000}))
    with pytest.raises(ValueError, match="sampling_rate 8000"):
        build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config={"pretrained_dir": directory})


def test_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "not-downloaded"
    with pytest.raises(FileNotFoundError, match="not-downloaded"):
        build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config={"pretrained_dir": missing})


def test_directory_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_hf_model(arch="hubert", labels=FOUR_CLASS, config={"pretrained_dir": tmp_path})


def test_other_model_types_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'"):
        build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config={"pretrained_dir": tmp_path})


def test_arch_must_match_the_checkpoint(tmp_path: Path) -> None:
    directory = _save_checkpoint(_tiny("wav2vec2"), tmp_path / "w2v")
    with pytest.raises(ValueError, match="holds a 'wav2vec2' checkpoint"):
        build_hf_model(arch="hubert", labels=FOUR_CLASS, config={"pretrained_dir": directory})


def test_checkpoint_without_weights_is_named(tmp_path: Path) -> None:
    directory = _save_checkpoint(_tiny("wav2vec2"), tmp_path / "half")
    (directory / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="half"):
        build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config={"pretrained_dir": directory})


def test_checkpoint_missing_backbone_weights_is_refused(tmp_path: Path) -> None:
    directory = _save_checkpoint(_tiny("wav2vec2"), tmp_path / "head-only")
    head = {"classifier.weight": torch.zeros(4, 16), "classifier.bias": torch.zeros(4)}
    save_file(head, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks .* backbone weights"):
        build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config={"pretrained_dir": directory})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "exactly one of .hf_config. \\(random weights\\) or .pretrained_dir."),
        ({"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=4), "pretrained_dir": "x"}, "exactly one"),
        ({"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=4), "dropout": 0.1}, "unknown wav2vec2 config"),
        ({"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=4), "arch": "hubert"}, "arch 'hubert'"),
        ({"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=4), "spec_version": 99}, "spec_version 99"),
        ({"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=3)}, "num_labels is 3"),
        ({"hf_config": tiny_hf_config(arch="hubert", n_labels=4)}, "model_type is 'hubert'"),
        ({"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=4), "normalize_waveform": 1}, "must be a bool"),
    ],
)
def test_bad_build_configs_are_explained(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config=config)


def test_unknown_arch_and_bad_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown transformers arch"):
        tiny_hf_config(arch="whisper", n_labels=2)
    config = {"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=2)}
    with pytest.raises(ValueError, match="unique"):
        build_hf_model(arch="wav2vec2", labels=("sad", "sad"), config=config)


def test_bad_waveforms_are_explained() -> None:
    model = _tiny("wav2vec2").eval()
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        model(torch.zeros(SR))
    with pytest.raises(TypeError, match="float64"):
        model(torch.zeros(1, SR, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"at least {model.min_samples}"):
        model(torch.zeros(1, model.min_samples - 1))
    assert model(_waves(1, model.min_samples / SR + 1e-9)).shape == (1, 4)
    model.train()
    with pytest.raises(ValueError, match="training needs at least"):
        model(_waves(2, model.min_samples / SR + 1e-9))


def test_min_input_samples_of_wav2vec2_base_is_its_receptive_field() -> None:
    from transformers import Wav2Vec2Config

    assert min_input_samples(Wav2Vec2Config()) == 400  # 25 ms window of wav2vec 2.0
    assert min_input_samples(Wav2Vec2Config(), frames=2) == 400 + 320  # 20 ms hop


def _export_onnx(model: HFSpeechClassifier) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (_waves(2, 1.0),),  # batch 2: a batch-1 example would pin the batch axis to 1
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["waveform"],
        output_names=["logits"],
        dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "logits": {0: "batch"}},
    )
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("wav2vec2", {}),
        ("hubert", {}),
        # the SUPERB ER recipe (weighted layer sum) on a wav2vec2-large style encoder
        ("wav2vec2", {"use_weighted_layer_sum": True, "feat_extract_norm": "layer", "do_stable_layer_norm": True}),
    ],
)
# TracerWarnings come from shape checks inside torch/transformers whose outcome does not depend on the
# length (checked below across lengths); the deprecation notes are about the legacy exporter itself.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::UserWarning", "ignore::DeprecationWarning")
def test_onnx_export_with_dynamic_batch_and_length_matches_pytorch(arch: str, extra: dict) -> None:
    torch.manual_seed(0)
    hf_config = {**tiny_hf_config(arch=arch, n_labels=4), **extra}
    model = build_hf_model(arch=arch, labels=FOUR_CLASS, config={"hf_config": hf_config}).eval()
    graph = _export_onnx(model)
    proto = onnx.load_from_string(graph)
    onnx.checker.check_model(proto)
    input_dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in input_dims] == ["batch", "samples"]
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    for batch, seconds in [(1, 1.0), (3, 2.5), (2, 0.3)]:
        x = _waves(batch, seconds, seed=batch)
        (onnx_logits,) = session.run(None, {"waveform": x.numpy()})
        with torch.no_grad():
            torch_logits = model(x).numpy()
        np.testing.assert_allclose(onnx_logits, torch_logits, rtol=0, atol=1e-4)
