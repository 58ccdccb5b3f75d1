"""Issue 12: the simulated federation on an indexed corpus, GPU settings, and one local SuperLink per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from serforget.cli.simulate import gpu_mismatch, simulation_nodes
from serforget.client.app import app as client_app
from serforget.client.runtime import node_device as client_device
from serforget.common.corpora import index_corpus
from serforget.common.manifest import SplitSpec, read_manifest, write_manifest
from serforget.common.pipeline import make_splits, training_speakers
from serforget.common.settings import RunSettings
from serforget.deploy.flwr_program import (
    LOCAL_CONTROL_PORT_ENV,
    LOCAL_HTTP_PORT_ENV,
    flwr_env,
    free_local_ports,
    is_our_local_superlink,
    stop_local_superlink,
    write_flower_home,
)
from serforget.server.app import app as server_app
from serforget.server.inprocess import InProcessGrid
from serforget.server.simulation import require_partition_nodes
from serforget.server.strategy import node_device as reply_device
from tests.helpers.audio import write_ravdess_tree
from tests.helpers.scenario import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ravdess_manifest(tmp_path: Path) -> Path:
    """12 RAVDESS actors, 8 four-class takes each, indexed the way `serforget corpus index` does."""
    root = write_ravdess_tree(tmp_path / "ravdess", actors=12)
    out = tmp_path / "ravdess.csv"
    write_manifest(out, index_corpus(fmt="ravdess", root=root).utterances)
    return out


# ----------------------------------------------------------------------------- partition


def test_training_speakers_are_the_train_split_and_held_out_speakers_are_not(
    ravdess_manifest: Path, tmp_path: Path
) -> None:
    split = SplitSpec(n_valid=1, n_test=2, seed=3)
    speakers = training_speakers(manifest=ravdess_manifest, split=split)
    splits = make_splits(manifest=ravdess_manifest, out_dir=tmp_path / "splits", split=split)
    assert speakers == sorted({u.speaker for u in read_manifest(splits["train"])})
    held_out = {u.speaker for name in ("valid", "test") for u in read_manifest(splits[name])}
    assert len(speakers) == 9 and len(held_out) == 3 and not held_out & set(speakers)
    cfg = RunSettings.from_mapping(
        {"data-manifest": str(ravdess_manifest), "valid-speakers": 1, "test-speakers": 2, "seed": 3}
    )
    assert simulation_nodes(cfg) == 9
    assert (
        simulation_nodes(RunSettings.from_mapping({"synth.speakers": 10, "valid-speakers": 1, "test-speakers": 2})) == 7
    )


def test_a_manifest_that_cannot_be_split_names_itself(ravdess_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"data-manifest .*ravdess.csv: cannot hold out 6 valid \+ 6 test speakers from 12"
    ):
        training_speakers(manifest=ravdess_manifest, split=SplitSpec(n_valid=6, n_test=6))
    with pytest.raises(ValueError, match="missing.csv"):
        training_speakers(manifest=tmp_path / "missing.csv")


def test_simulate_refuses_a_missing_manifest_before_starting_flower(tmp_path: Path, capsys) -> None:
    from serforget.cli import main

    args = ["simulate", "--app", str(ROOT), "--work-dir", str(tmp_path / "sim"), "--flwr-home", str(tmp_path / "flwr")]
    assert main([*args, "--manifest", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert not (tmp_path / "flwr").exists()
    if not torch.cuda.is_available():
        assert main([*args, "--run-config", "gpus-per-node=0.5"]) == 2
        assert "gpus-per-node = 0.5 but no CUDA device is visible" in capsys.readouterr().err


class _Nodes:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(self.n))


def test_node_count_must_equal_the_partitions() -> None:
    assert require_partition_nodes(_Nodes(9), n_partitions=9, timeout=0) == list(range(9))
    with pytest.raises(
        ValueError, match=r"2 SuperNodes connected .* 9 training-speaker partitions: set num-supernodes = 9"
    ):
        require_partition_nodes(_Nodes(2), n_partitions=9, timeout=0)
    with pytest.raises(ValueError, match=r"11 SuperNodes connected .* 9 training-speaker partitions"):
        require_partition_nodes(_Nodes(11), n_partitions=9, timeout=0)


def _manifest_config(work: Path, manifest: Path) -> dict:
    return {
        **TINY,
        "work-dir": str(work),
        "data-manifest": str(manifest),
        "valid-speakers": 1,
        "test-speakers": 2,
        "clip-seconds": 1.0,
    }


def test_server_app_refuses_a_simulation_with_more_nodes_than_speakers(ravdess_manifest: Path, tmp_path: Path) -> None:
    config = _manifest_config(tmp_path / "sim", ravdess_manifest)
    grid = InProcessGrid(client_app, run_config=config, n_nodes=10)
    with pytest.raises(ValueError, match=r"10 SuperNodes connected .* 9 training-speaker partitions"):
        server_app(
            grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
        )
    assert grid.calls == []  # refused before any node was asked to train


@pytest.mark.slow
def test_in_process_scenario_on_a_ravdess_manifest_records_devices(ravdess_manifest: Path, tmp_path: Path) -> None:
    work = tmp_path / "sim"
    config = _manifest_config(work, ravdess_manifest)
    grid = InProcessGrid(client_app, run_config=config, n_nodes=9)
    server_app(grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["n_nodes"] == 9
    nodes = {json.loads((work / "nodes" / f"{p:03d}" / "node.json").read_text())["speaker"] for p in range(9)}
    held_out = {u.speaker for name in ("valid", "test") for u in read_manifest(work / "splits" / f"{name}.csv")}
    assert len(nodes) == 9 and not nodes & held_out  # valid/test speakers are never a node's training data
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert len(report["node_devices"]["train"]) == 9
    assert {d["device"] for d in report["node_devices"]["train"].values()} == {expected}
    assert {d["device"] for d in report["node_devices"]["unlearn"].values()} == {expected}
    assert f"devices (train): {expected}: 9 node(s)" in (work / "report" / "report.md").read_text()


# ----------------------------------------------------------------------------- GPU settings


def test_gpus_per_node_becomes_client_resources(tmp_path: Path) -> None:
    write_flower_home(tmp_path, num_supernodes=9, cpus_per_node=2, gpus_per_node=0.25)
    local = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]["local"]
    assert local["options"]["num-supernodes"] == 9
    assert local["options"]["backend"]["client-resources"] == {"num-cpus": 2, "num-gpus": 0.25}
    with pytest.raises(ValueError, match="at least one SuperNode"):
        write_flower_home(tmp_path, num_supernodes=0, cpus_per_node=1)
    with pytest.raises(ValueError, match="gpus-per-node"):
        RunSettings.from_mapping({"gpus-per-node": -1.0})


def test_gpu_settings_that_cannot_work_are_refused_with_the_fix() -> None:
    cfg = lambda **kv: RunSettings.from_mapping(kv)
    assert gpu_mismatch(cfg(), cuda_visible=False) is None
    assert gpu_mismatch(cfg(**{"gpus-per-node": 0.5}), cuda_visible=True) is None
    assert gpu_mismatch(cfg(device="cuda", **{"gpus-per-node": 0.5}), cuda_visible=True) is None
    assert "no CUDA device is visible" in gpu_mismatch(cfg(**{"gpus-per-node": 0.5}), cuda_visible=False)
    assert "no CUDA device is visible" in gpu_mismatch(cfg(device="cuda:0"), cuda_visible=False)
    assert "needs gpus-per-node > 0" in gpu_mismatch(cfg(device="cuda"), cuda_visible=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")
def test_node_without_cuda_refuses_cuda_and_reports_a_cpu_fallback_of_auto() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        client_device(RunSettings.from_mapping({"device": "cuda"}))
    assert client_device(RunSettings.from_mapping({})) == ("cpu", "")
    device, note = client_device(RunSettings.from_mapping({"gpus-per-node": 0.5}))
    assert device == "cpu" and "gpus-per-node = 0.5 but no CUDA device is visible" in note


def test_a_round_no_node_trained_in_stops_the_run_with_the_nodes_reasons(tmp_path: Path) -> None:
    """Every node's train reply is an error (as ``device = cuda`` on nodes without a GPU makes it, see above):
    the ServerApp stops instead of publishing the untrained initial model."""
    config = {**TINY, "work-dir": str(tmp_path / "sim")}
    grid = InProcessGrid(client_app, run_config=config, n_nodes=4, fail_types=("train",))
    with pytest.raises(RuntimeError, match=r"FedAvg round 1: no node trained .*injected failure for train"):
        server_app(
            grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
        )
    assert not (tmp_path / "sim" / "server" / "releases" / "1").exists()


def test_reply_device_record_is_read_defensively() -> None:
    def reply(info: dict | None) -> Message:
        content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
        if info is not None:
            content["node-info"] = ConfigRecord(info)
        return Message(content, dst_node_id=1, message_type="train")

    assert reply_device(reply({"node-id": "n1", "device": "cuda:0", "device-note": ""})) == {
        "node": "n1",
        "device": "cuda:0",
        "note": "",
    }
    assert reply_device(reply(None)) is None
    assert reply_device(reply({"node-id": "n1", "device": 3})) is None  # not a string: ignored, not trusted
    assert len(reply_device(reply({"node-id": "n" * 10_000, "device": "cpu"}))["node"]) == 200


# ----------------------------------------------------------------------------- one local SuperLink per run


def test_each_run_gets_its_own_local_superlink_ports(tmp_path: Path) -> None:
    http, control = free_local_ports()
    assert http != control and min(http, control) > 0
    env = flwr_env(tmp_path, local_ports=(http, control))
    assert env[LOCAL_HTTP_PORT_ENV] == str(http) and env[LOCAL_CONTROL_PORT_ENV] == str(control)
    assert LOCAL_HTTP_PORT_ENV not in flwr_env(tmp_path) or flwr_env(tmp_path)[LOCAL_HTTP_PORT_ENV] == os.environ.get(
        LOCAL_HTTP_PORT_ENV
    )


def test_local_superlink_is_matched_by_exact_flwr_home_and_port(tmp_path: Path) -> None:
    home = tmp_path / "flwr"
    argv = lambda h, port: [
        sys.executable,
        "/venv/bin/flower-superlink",
        "--insecure",
        "--simulation",
        "--port",
        port,
        "--log-file",
        str(h / "local-superlink" / "superlink.log"),
    ]
    assert is_our_local_superlink(argv(home, "40001"), home)
    assert is_our_local_superlink(argv(home, "40001"), home, "40001")
    assert not is_our_local_superlink(argv(home, "40002"), home, "40001")  # same home, another run's port
    assert not is_our_local_superlink(
        argv(tmp_path / "x" / tmp_path.relative_to("/") / "flwr", "40001"), home
    )  # nested home
    assert not is_our_local_superlink(
        ["/bin/sleep", "--log-file", str(home / "local-superlink" / "superlink.log")], home
    )


@pytest.mark.slow
def test_stop_local_superlink_ends_only_its_own(tmp_path: Path) -> None:
    """Two fake `flower-superlink` processes: one of this FLWR_HOME and port, one of a nested FLWR_HOME."""
    script = tmp_path / "bin" / "flower-superlink"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    script.chmod(0o755)
    home, other = tmp_path / "flwr", tmp_path / "nested" / tmp_path.relative_to("/") / "flwr"
    start = lambda h, port: subprocess.Popen(
        [str(script), "--port", port, "--log-file", str(h / "local-superlink" / "superlink.log")]
    )
    ours, theirs, same_home_other_port = start(home, "40001"), start(other, "40001"), start(home, "40002")
    try:
        for _ in range(100):  # wait until the three have exec'd the script (their argv is in /proc)
            cmdlines = [Path(f"/proc/{p.pid}/cmdline").read_bytes() for p in (ours, theirs, same_home_other_port)]
            if all(b"flower-superlink" in c for c in cmdlines):
                break
            time.sleep(0.05)
        assert stop_local_superlink(home, port="40001") == [ours.pid]
        assert ours.wait(timeout=10) != 0
        assert theirs.poll() is None and same_home_other_port.poll() is None
    finally:
        for proc in (ours, theirs, same_home_other_port):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ----------------------------------------------------------------------------- acceptance


def _index_then_simulate(tmp_path: Path, run_config: str) -> tuple[dict, Path, str]:
    """`corpus index --format ravdess` on a 12-actor tree, then `simulate --manifest` through `flwr run`."""
    root = write_ravdess_tree(tmp_path / "RAVDESS", actors=12)
    manifest = tmp_path / "ravdess.csv"
    cli = [sys.executable, "-m", "serforget"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    indexed = subprocess.run(
        [*cli, "corpus", "index", "--format", "ravdess", "--root", str(root), "--out", str(manifest)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert indexed.returncode == 0, indexed.stderr
    assert "96 utterances from 12 speakers" in indexed.stdout
    tiny = (
        "valid-speakers=1 test-speakers=2 num-rounds=2 local-epochs=1 clip-seconds=1.0 scenario.partial-n=3 "
        "importance-max-utts=8 max-ua-drop=100.0 unlearn.max-epochs=5 unlearn.pgd-k=1 unlearn.pgd-steps=3 "
    )
    sim = [*cli, "simulate", "--app", str(ROOT), "--work-dir", str(tmp_path / "sim"), "--flwr-home"]
    done = subprocess.run(
        [*sim, str(tmp_path / "flwr"), "--manifest", str(manifest), "--run-config", tiny + run_config],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(9 SuperNodes)" in done.stdout
    return json.loads((tmp_path / "sim" / "report" / "report.json").read_text()), manifest, done.stdout


@pytest.mark.slow
def test_corpus_index_then_simulate_on_a_ravdess_tree(tmp_path: Path) -> None:
    """Issue 12's acceptance: `corpus index --format ravdess` then `simulate --manifest` writes the report."""
    report, manifest, _ = _index_then_simulate(
        tmp_path, "release.onnx-export=false model.channels='8,16' model.hidden=16"
    )
    assert report["n_nodes"] == 9 and report["settings"]["data-manifest"] == str(manifest.resolve())
    assert report["releases"]["unlearned"] == 2
    assert len(report["node_devices"]["train"]) == 9
    assert not (tmp_path / "sim" / "corpus").exists()  # nothing synthesized


@pytest.mark.slow
def test_corpus_index_then_simulate_with_a_tiny_wav2vec2_training_its_head(tmp_path: Path) -> None:
    """The same through `flwr run` with a transformers backbone: a local checkpoint, only the head travels."""
    from serforget.common.labels import FOUR_CLASS
    from serforget.common.models.hf import build_hf_model, tiny_hf_config

    torch.manual_seed(0)
    hf_config = {"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=len(FOUR_CLASS))}
    build_hf_model(arch="wav2vec2", labels=FOUR_CLASS, config=hf_config).backbone.save_pretrained(tmp_path / "w2v2")
    report, _, _ = _index_then_simulate(
        tmp_path,
        f"release.onnx-export=true model.arch='wav2vec2' model.pretrained-dir='{tmp_path / 'w2v2'}' "
        "model.trainable='head'",
    )
    assert report["n_nodes"] == 9 and report["releases"]["unlearned"] == 2
    assert report["traffic"]["trainable"] == "head" and report["traffic"]["tensors"] == 4
    assert len(report["node_release_reports"]) == 9  # every device verified the completed model
    assert "model.onnx" in report["releases"]["files"]


@pytest.mark.slow
def test_two_simulations_at_once_each_start_and_stop_their_own_superlink(tmp_path: Path) -> None:
    """Two `serforget simulate` runs in parallel: each its own local SuperLink (own ports), both complete."""
    tiny = (
        "synth.speakers=6 synth.sentences=2 synth.takes=1 valid-speakers=1 test-speakers=1 num-rounds=1 local-epochs=1 "
        "clip-seconds=1.0 scenario.partial-n=3 scenario.partial-node=0 scenario.whole-node=1 importance-max-utts=8 "
        "max-ua-drop=100.0 release.onnx-export=false retrain-oracle=false model.channels='8,16' model.hidden=16 "
        "unlearn.max-epochs=3 unlearn.pgd-k=1 unlearn.pgd-steps=2"
    )
    runs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serforget",
                "simulate",
                "--app",
                str(ROOT),
                "--work-dir",
                str(tmp_path / name / "sim"),
                "--flwr-home",
                str(tmp_path / name / "flwr"),
                "--run-config",
                tiny,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for name in ("a", "b")
    }
    outputs = {name: proc.communicate()[0] for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, outputs[name][-3000:]
        assert (tmp_path / name / "sim" / "report" / "report.json").exists()
        log = tmp_path / name / "flwr" / "local-superlink" / "superlink.log"
        assert log.exists(), f"run {name} did not start its own local SuperLink"
    # every SuperLink the two runs started is gone again
    alive = [
        p
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and str(tmp_path).encode() in _cmdline(p) and b"flower-superlink" in _cmdline(p)
    ]
    assert alive == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_server_app_splits_by_the_fixed_speaker_lists(ravdess_manifest: Path, tmp_path: Path) -> None:
    """split.protocol = speakers reaches the ServerApp's provisioning: those speakers are held out, the rest are nodes."""
    speakers = sorted({u.speaker for u in read_manifest(ravdess_manifest)})
    config = {
        **_manifest_config(tmp_path / "sim", ravdess_manifest),
        "valid-speakers": 3,  # unused by the fixed lists
        "split.protocol": "speakers",
        "split.valid-list": ",".join(speakers[:2]),
        "split.test-list": speakers[-1],
    }
    grid = InProcessGrid(client_app, run_config=config, n_nodes=10)
    with pytest.raises(ValueError, match=r"10 SuperNodes connected .* 9 training-speaker partitions"):
        server_app(
            grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
        )
    splits = tmp_path / "sim" / "splits"
    assert {u.speaker for u in read_manifest(splits / "valid.csv")} == set(speakers[:2])
    assert {u.speaker for u in read_manifest(splits / "test.csv")} == {speakers[-1]}
