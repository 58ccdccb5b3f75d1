"""The Deployment Engine for real, on loopback: a SuperLink with TLS and SuperNode authentication,
three SuperNodes (one per speaker), ``flwr run`` end to end, and the fault cases of a deployment.

One deployment serves the whole module (starting it and installing the app in every process is
the expensive part); the tests run in file order on it and each files its own deletion request.
Every process is started through deploy's PID files and stopped by the fixture's finalizer.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from serforget.cli import main as serforget
from serforget.client.ledger import Ledger
from serforget.common.fsutil import atomic_write_bytes
from serforget.common.keys import load_signing_public
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import Utterance, write_manifest
from serforget.common.release import ReleaseRegistry
from serforget.deploy.local import (
    Deployment,
    deployment_run_config,
    down,
    finish_run,
    free_port,
    online_nodes,
    register_supernode,
    run_app,
    start_superlink,
    start_supernode,
    submit_run,
    up,
    wait_online,
)
from serforget.deploy.pki import create_node_auth_key
from tests.helpers.audio import tone

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[1]
TINY = {
    "local-epochs": 1,
    "clip-seconds": 0.5,
    "release.onnx-export": False,
    "device": "cpu",
    "batch-size": 8,
    "model.channels": "8,16",
    "model.hidden": 16,
    "importance-max-utts": 8,
    "unlearn.max-epochs": 3,
    "unlearn.pgd-k": 1,
    "unlearn.pgd-steps": 2,
    "round-timeout": 120.0,
    "unlearn.timeout": 120.0,
    # a tiny held-out set makes one flipped utterance worth >10 UA points: the gate is tested elsewhere
    "max-ua-drop": 100.0,
}
UNLEARN_ONLY = {"resume": True, "num-rounds": 0}
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    """A running federation: SuperLink (TLS + node auth) and 3 SuperNodes; always shut down."""
    root = tmp_path_factory.mktemp("deploy")
    base = {"neutral": 220.0, "happy": 440.0, "angry": 660.0, "sad": 150.0}
    utts = [
        Utterance(
            f"spk{s}_{e}_{t}",
            _save(root / "corpus" / f"spk{s}_{e}_{t}.wav", tone(base[e] * (1 + 0.03 * s), 0.5, seed=s * 100 + t)),
            f"spk{s}",
            e,
        )
        for s in range(3)
        for e in FOUR_CLASS
        for t in range(2)
    ]
    write_manifest(root / "corpus" / "manifest.csv", utts)
    deployment = Deployment(root / "run", port=free_port(), control_port=free_port())
    try:
        devices = up(deployment, manifest=root / "corpus" / "manifest.csv", ports=[free_port() for _ in range(3)])
        ids = {register_supernode(deployment, public_key=d.auth_key.public) for d in devices}
        yield deployment, devices, ids, root / "corpus" / "manifest.csv"
    finally:
        down(deployment)
    assert not deployment.processes.names()


def _save(path: Path, audio) -> Path:
    from serforget.common.audio import save_audio

    return save_audio(path, audio)


def _config(deployment: Deployment, manifest: Path, **overrides) -> dict:
    return deployment_run_config(
        deployment, min_nodes=3, overrides={**TINY, "eval-manifest": str(manifest), **overrides}
    )


def _report(deployment: Deployment) -> dict:
    return json.loads((deployment.work_dir / "report" / "report.json").read_text())


def _registry(deployment: Deployment) -> tuple[ReleaseRegistry, object]:
    return ReleaseRegistry(deployment.server.releases), load_signing_public(deployment.server.keys_dir / "sign.pub")


def _request(device, request_id: str):
    with Ledger(device.data_dir / "ledger.sqlite") as ledger:
        return ledger.get(request_id)


def _forget(device, utt: str) -> str:
    """File a deletion request on a device with the CLI, as its speaker would."""
    assert serforget(["node", "forget", "--data-dir", str(device.data_dir), "--utt", utt]) == 0
    with Ledger(device.data_dir / "ledger.sqlite") as ledger:
        return next(r.request_id for r in ledger.all() if utt in r.utt_ids)


def _wait_for(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def test_unregistered_and_wrong_key_supernodes_are_refused(fed) -> None:
    deployment, devices, ids, _ = fed
    stranger = deployment.device("stranger", port=free_port())
    stranger.data_dir.mkdir(parents=True, exist_ok=True)
    (stranger.data_dir / "node.json").write_text(json.dumps({"format_version": 1, "node_id": "node-x", "speaker": "x"}))
    unregistered = create_node_auth_key(out_dir=stranger.data_dir / "keys")
    # a registered device's identity, but a key that is not the registered one, and of the wrong kind
    wrong = deployment.root / "wrong_key"
    atomic_write_bytes(
        wrong,
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        mode=0o600,
    )
    impostor = deployment.device(devices[0].name, port=free_port())
    impostor = type(impostor)("impostor", impostor.data_dir, impostor.auth_key, impostor.port)
    table = deployment.processes
    start_supernode(deployment, stranger, private_key=unregistered.private)
    start_supernode(deployment, impostor, private_key=wrong)
    try:
        assert table.wait_exit(stranger.process_name, timeout=90) not in (None, 0)
        assert table.wait_exit(impostor.process_name, timeout=90) not in (None, 0)
        assert "Failed to activate SuperNode" in table.get(stranger.process_name).log_text()
        assert "Unable to parse the private key" in table.get(impostor.process_name).log_text()
        assert online_nodes(deployment) == ids
    finally:
        table.stop(stranger.process_name)
        table.stop(impostor.process_name)


def test_training_deletion_unlearning_and_release_end_to_end(fed) -> None:
    deployment, devices, ids, manifest = fed
    rid = _forget(devices[1], "spk1_happy_0")
    outcome = run_app(
        deployment, app=APP, run_config=_config(deployment, manifest, **{"num-rounds": 1}), timeout=RUN_TIMEOUT
    )
    assert outcome.ok, (outcome.status, outcome.details, outcome.log[-3000:])
    report = _report(deployment)
    assert report["mode"] == "deployment"
    assert (
        report["releases"]["trained"] == 1
        and report["releases"]["unlearned"] == 2
        and report["releases"]["revoked"] == [1]
    )
    assert [v["accepted"] for v in report["unlearning"]["verdicts"]] == [True]
    registry, key = _registry(deployment)
    assert registry.verify(2, public_key=key).applied_request_ids == (rid,)
    assert registry.latest(public_key=key).version == 2
    assert _request(devices[1], rid).state == "purged"
    assert not (devices[1].data_dir / "wav" / "spk1_happy_0.wav").exists()
    assert (devices[1].data_dir / "wav" / "spk1_happy_1.wav").exists()


def test_node_killed_during_unlearning_publishes_nothing_and_completes_after_restart(fed) -> None:
    deployment, devices, ids, manifest = fed
    victim = devices[2]
    rid = _forget(victim, "spk2_sad_0")
    registry, key = _registry(deployment)
    versions = registry.versions()
    log = deployment.processes.get(victim.process_name).log
    already = log.read_text().count("Receiving: query.unlearn")
    slow = {
        **UNLEARN_ONLY,
        "unlearn.timeout": 30.0,
        "round-timeout": 45.0,
        "unlearn.max-epochs": 50,
        "unlearn.pgd-k": 1,
        "unlearn.pgd-steps": 200,
        "unlearn.stop": "zero",
    }
    submitted = submit_run(deployment, app=APP, run_config=_config(deployment, manifest, **slow), timeout=RUN_TIMEOUT)
    try:
        _wait_for(
            lambda: log.read_text().count("Receiving: query.unlearn") > already,
            timeout=180,
            what="query.unlearn on the victim",
        )
        deployment.processes.kill(victim.process_name)
    finally:
        outcome = finish_run(deployment, submitted, timeout=RUN_TIMEOUT)
    assert outcome.ok, (outcome.status, outcome.details, outcome.log[-3000:])
    report = _report(deployment)
    assert not any(v["accepted"] for v in report["unlearning"]["verdicts"])
    assert report["releases"]["unlearned"] is None and registry.versions() == versions
    assert _request(victim, rid).state == "pending"
    assert (victim.data_dir / "wav" / "spk2_sad_0.wav").exists()
    # the device comes back with the same key; the next unlearning round completes the request
    start_supernode(deployment, victim)
    wait_online(deployment, ids, timeout=120)
    outcome = run_app(
        deployment, app=APP, run_config=_config(deployment, manifest, **UNLEARN_ONLY), timeout=RUN_TIMEOUT
    )
    assert outcome.ok, (outcome.status, outcome.details, outcome.log[-3000:])
    new = max(registry.versions())
    assert new == max(versions) + 1 and registry.verify(new, public_key=key).applied_request_ids == (rid,)
    assert _request(victim, rid).state == "purged"


def test_server_killed_before_publishing_leaves_a_consistent_registry_and_the_round_reruns(fed) -> None:
    deployment, devices, ids, manifest = fed
    device = devices[0]
    rid = _forget(device, "spk0_angry_1")
    registry, key = _registry(deployment)
    versions = registry.versions()
    seen_before = deployment.server.seen_ids()
    # hold the registry's writer lock: the ServerApp gets the deltas, remembers them, then blocks in publish
    lock = os.open(deployment.server.releases / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    submitted = submit_run(
        deployment, app=APP, run_config=_config(deployment, manifest, **UNLEARN_ONLY), timeout=RUN_TIMEOUT
    )
    try:
        _wait_for(lambda: deployment.server.seen_ids() - seen_before, timeout=240, what="the accepted delta")
        time.sleep(1.0)
        deployment.processes.kill("superlink")  # the SuperLink and its ServerApp process, SIGKILL
    finally:
        submitted.kill()
        submitted.communicate()
        os.close(lock)
    first_delivery = deployment.server.seen_ids() - seen_before
    assert len(first_delivery) == 1
    assert registry.versions() == versions
    for version in versions:
        registry.verify(version, public_key=key)
    assert registry.latest(public_key=key).version == max(versions)
    assert _request(device, rid).state == "unlearned"  # the device sent its delta; no release applies it
    # restart the SuperLink on the same state database; devices reconnect (or are restarted, like systemd would)
    start_superlink(deployment)
    for d in devices:
        if not deployment.processes.get(d.process_name).is_running():
            start_supernode(deployment, d)
    wait_online(deployment, ids, timeout=120)
    outcome = run_app(
        deployment, app=APP, run_config=_config(deployment, manifest, **UNLEARN_ONLY), timeout=RUN_TIMEOUT
    )
    assert outcome.ok, (outcome.status, outcome.details, outcome.log[-3000:])
    report = _report(deployment)
    # delivered twice (before the crash and again now), applied once
    assert [v["accepted"] for v in report["unlearning"]["verdicts"]] == [True]
    new = max(registry.versions())
    assert new == max(versions) + 1 and registry.verify(new, public_key=key).applied_request_ids == (rid,)
    assert [v for v in registry.versions() if rid in registry.manifest(v).applied_request_ids] == [new]
    assert _request(device, rid).state == "purged"
    assert len(deployment.server.seen_ids() - seen_before) == 2


def test_a_tiny_wav2vec2_federation_sends_only_its_head(fed, tmp_path: Path) -> None:
    """Deployment with a transformers backbone: every host has the checkpoint, only the head crosses the network."""
    import torch

    from serforget.common.models.hf import build_hf_model, tiny_hf_config

    deployment, devices, ids, manifest = fed
    torch.manual_seed(0)
    hf_config = {"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=len(FOUR_CLASS))}
    build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config=hf_config).backbone.save_pretrained(tmp_path / "w2v2")
    rid = _forget(devices[0], "spk0_sad_1")
    cnn_only = {"model.channels", "model.hidden"}
    config = {k: v for k, v in _config(deployment, manifest, **{"num-rounds": 1}).items() if k not in cnn_only}
    config.update({"model.arch": "wav2vec2", "model.pretrained-dir": str(tmp_path / "w2v2"), "model.trainable": "head"})
    outcome = run_app(deployment, app=APP, run_config=config, timeout=RUN_TIMEOUT)
    assert outcome.ok, (outcome.status, outcome.details, outcome.log[-3000:])
    report = _report(deployment)
    assert report["traffic"]["trainable"] == "head" and report["traffic"]["tensors"] == 4
    assert [v["accepted"] for v in report["unlearning"]["verdicts"]] == [True]
    registry, key = _registry(deployment)
    assert rid in registry.verify(report["releases"]["unlearned"], public_key=key).applied_request_ids
    assert _request(devices[0], rid).state == "purged"
