"""model.trainable: only the trainable tensors travel; a tiny wav2vec2 goes through the whole federated path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from serforget.client.app import app as client_app
from serforget.client.runtime import model_from
from serforget.common.labels import FOUR_CLASS
from serforget.common.models import build_model
from serforget.common.models.hf import build_hf_model, tiny_hf_config
from serforget.common.protocol import FROZEN_SHA256
from serforget.common.settings import RunSettings, SettingsError
from serforget.common.traffic import Traffic, complete, frozen_sha256, set_trainable
from serforget.server.app import app as server_app
from serforget.server.inprocess import InProcessGrid
from tests.helpers.scenario import TINY


def _tiny_w2v2(seed: int = 0):
    torch.manual_seed(seed)
    config = {"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=len(FOUR_CLASS))}
    return build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config=config)


@pytest.fixture()
def pretrained_dir(tmp_path: Path) -> Path:
    """A local checkpoint folder as a user downloads it (transformers' save format)."""
    _tiny_w2v2().backbone.save_pretrained(tmp_path / "w2v2")
    return tmp_path / "w2v2"


def _hf_settings(pretrained_dir: Path, **extra) -> dict:
    cnn_only = ("model.channels", "model.hidden")
    return {
        **{k: v for k, v in TINY.items() if k not in cnn_only},
        "model.arch": "wav2vec2",
        "model.pretrained-dir": str(pretrained_dir),
        **extra,
    }


def test_scopes_choose_head_top_layers_or_every_trainable_tensor() -> None:
    head = set_trainable(_tiny_w2v2(), "head")
    assert head == [
        "backbone.projector.weight",
        "backbone.projector.bias",
        "backbone.classifier.weight",
        "backbone.classifier.bias",
    ]
    model = _tiny_w2v2()
    top = set_trainable(model, "top-1")
    assert set(head) < set(top) and all(".layers.0." not in k for k in top)
    assert any(".encoder.layers.1." in k for k in top)
    assert {k for k, p in model.named_parameters() if p.requires_grad} == set(top)  # the rest is frozen
    everything = set_trainable(_tiny_w2v2(), "all")
    assert not any("feature_extractor" in k for k in everything)  # the frozen feature encoder stays home
    with pytest.raises(ValueError, match="only 2 transformer layers"):
        set_trainable(_tiny_w2v2(), "top-3")
    cnn = build_model(arch="logmel_cnn", config={}, labels=FOUR_CLASS)
    assert set_trainable(cnn, "all") == list(cnn.state_dict())
    with pytest.raises(ValueError, match="needs a pre-trained backbone"):
        set_trainable(cnn, "head")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model.trainable": "top-0"}, r"^model\.trainable: must be 'all', 'head' or 'top-N'"),
        ({"model.trainable": "last"}, r"^model\.trainable: must be 'all', 'head' or 'top-N'"),
        ({"model.trainable": "head"}, r"^model\.trainable: set, but model\.arch = 'logmel_cnn'"),
    ],
)
def test_bad_trainable_settings_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_mapping(raw)


def test_completion_refuses_other_tensors_and_shapes() -> None:
    model = _tiny_w2v2()
    keys, full = set_trainable(model, "head"), model.state_dict()
    sent = {k: full[k] for k in keys}
    assert complete(full, sent, keys).keys() == full.keys()
    with pytest.raises(ValueError, match="do not match model.trainable: missing"):
        complete(full, {k: sent[k] for k in keys[:-1]}, keys)
    with pytest.raises(ValueError, match="unexpected .*feature_extractor"):
        complete(full, {**sent, "backbone.wav2vec2.feature_extractor.conv_layers.0.conv.weight": torch.zeros(1)}, keys)
    with pytest.raises(ValueError, match="shape"):
        complete(full, {**sent, keys[0]: torch.zeros(2, 2)}, keys)


def test_a_device_with_another_checkpoint_refuses_the_model(pretrained_dir: Path, tmp_path: Path) -> None:
    cfg = RunSettings.from_mapping(_hf_settings(pretrained_dir, **{"model.trainable": "head"}))
    server_model = build_model(arch=cfg.model_arch, config=cfg.model_config, labels=FOUR_CLASS)
    traffic = Traffic.of(server_model, "head", server_model.state_dict())
    arrays = ArrayRecord(traffic.send(server_model.state_dict()))
    model, keys = model_from(arrays, cfg, ConfigRecord({FROZEN_SHA256: traffic.frozen}))
    assert keys == traffic.keys and frozen_sha256(model.state_dict(), keys) == traffic.frozen
    _tiny_w2v2(seed=1).backbone.save_pretrained(tmp_path / "other")  # another download, other weights
    other = RunSettings.from_mapping(_hf_settings(tmp_path / "other", **{"model.trainable": "head"}))
    with pytest.raises(ValueError, match=r"differs from the server's.*frozen-sha256"):
        model_from(arrays, other, ConfigRecord({FROZEN_SHA256: traffic.frozen}))
    with pytest.raises(ValueError, match="differs from the server's"):
        model_from(arrays, cfg, ConfigRecord({}))  # a message without the hash is refused too


@pytest.mark.slow
def test_tiny_wav2vec2_head_only_through_fedavg_unlearning_release_and_edge(
    pretrained_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from serforget.common.edge.predict import predict_files
    from serforget.common.release import ReleaseRegistry

    work = tmp_path / "sim"
    config = _hf_settings(
        pretrained_dir, **{"work-dir": str(work), "model.trainable": "head", "release.onnx-export": True}
    )
    grid = InProcessGrid(client_app, run_config=config, n_nodes=4)
    server_app(grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    report = json.loads((work / "report" / "report.json").read_text())
    traffic = report["traffic"]
    assert traffic["trainable"] == "head" and traffic["tensors"] == 4
    assert traffic["bytes_per_model"] * 20 < traffic["full_model_bytes"]
    assert traffic["fedavg_bytes_per_round"] == 2 * 4 * traffic["bytes_per_model"]
    assert report["unlearning"]["bytes_sent"] == 2 * traffic["bytes_per_model"]  # two nodes unlearn
    assert [v["accepted"] for v in report["unlearning"]["verdicts"]] == [True, True]
    assert report["releases"]["unlearned"] == 2
    # every device completed the announced head with its own checkpoint and verified the signed weights
    assert len(report["node_release_reports"]) == 4
    release = ReleaseRegistry(work / "server" / "releases").path(2)
    published = load_file(str(release / "model.safetensors"))
    original = _tiny_w2v2().state_dict()
    frozen = [k for k in original if not k.startswith(("backbone.projector", "backbone.classifier"))]
    assert all(torch.equal(published[k], original[k]) for k in frozen)  # only the head ever changed
    wav = sorted((work / "corpus").rglob("*.wav"))[0]
    run = predict_files(model=release, files=[wav], threads=1).to_dict()
    assert run["model"]["release_version"] == 2 and run["predictions"][0]["label"] in FOUR_CLASS


def test_a_stored_importance_map_is_cut_to_what_travels() -> None:
    model = _tiny_w2v2()
    traffic = Traffic.of(model, "head", model.state_dict())
    wide = {k: torch.ones_like(p) for k, p in _tiny_w2v2().named_parameters() if p.requires_grad}
    assert set(traffic.restrict(wide)) == set(traffic.keys)
    assert traffic.restrict(None) is None
