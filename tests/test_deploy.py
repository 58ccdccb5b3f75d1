"""deploy/: TLS material, PID-file process control, and write failures that must leave state intact.

The write-failure tests run the writer in a child process under a real OS restriction: a file
size limit (``RLIMIT_FSIZE``: writes fail exactly as on a full disk) or a read-only folder
(for root, the child also drops the capabilities that bypass file permissions).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from serforget.client.ledger import Ledger
from serforget.client.node import file_deletion_request, prepare_node_dir
from serforget.common.manifest import by_speaker, read_manifest
from serforget.deploy.pki import (
    PKIError,
    create_ca,
    create_node_auth_key,
    issue_server_certificate,
    load_node_auth_public,
)
from serforget.deploy.processes import ProcessTable, start_ticks

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ PKI


def test_superlink_certificate_chains_to_the_ca_and_names_every_host(tmp_path: Path) -> None:
    ca = create_ca(out_dir=tmp_path)
    tls = issue_server_certificate(ca=ca, out_dir=tmp_path, hosts=["127.0.0.1", "superlink.example.org"])
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert.read_bytes()))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert stat.S_IMODE(tls.key.stat().st_mode) == 0o600 and stat.S_IMODE(ca.key.stat().st_mode) == 0o600


def test_reprovisioning_keeps_keys_and_adding_a_host_reissues_with_the_same_key(tmp_path: Path) -> None:
    ca = create_ca(out_dir=tmp_path)
    tls = issue_server_certificate(ca=ca, out_dir=tmp_path, hosts=["127.0.0.1"])
    ca_bytes, cert_bytes, key_bytes = ca.cert.read_bytes(), tls.cert.read_bytes(), tls.key.read_bytes()
    assert create_ca(out_dir=tmp_path) == ca and ca.cert.read_bytes() == ca_bytes
    issue_server_certificate(ca=ca, out_dir=tmp_path, hosts=["127.0.0.1"])
    assert tls.cert.read_bytes() == cert_bytes
    issue_server_certificate(ca=ca, out_dir=tmp_path, hosts=["127.0.0.1", "10.0.0.5"])
    assert tls.cert.read_bytes() != cert_bytes and tls.key.read_bytes() == key_bytes
    sans = x509.load_pem_x509_certificate(tls.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert {str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}


def test_node_auth_key_is_an_openssh_p384_key_flower_accepts(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    key = create_node_auth_key(out_dir=tmp_path / "keys")
    public = load_node_auth_public(key.public)
    assert isinstance(public.curve, ec.SECP384R1) and key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    private = load_ssh_private_key(key.private.read_bytes(), None)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    assert create_node_auth_key(out_dir=tmp_path / "keys").public.read_bytes() == key.public.read_bytes()


def test_a_non_ec_public_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = tmp_path / "ed.pub"
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(PKIError, match="ed.pub"):
        load_node_auth_public(path)


# ------------------------------------------------------------------ processes


_TREE = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"


def test_stop_ends_the_started_process_and_what_it_spawned(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path)
    process = table.start(name="tree", argv=[sys.executable, "-c", _TREE], env=dict(os.environ))
    try:
        deadline = time.monotonic() + 30
        while len(process.members()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        members = process.members()
        assert len(members) == 2 and process.pid in members
        assert json.loads((tmp_path / "pids" / "tree.json").read_text())["pid"] == process.pid
        assert table.stop_all(timeout=10) == ["tree"]
        assert not process.is_running() and not process.members()
        assert not (tmp_path / "pids" / "tree.json").exists()
    finally:
        process.signal(signal.SIGKILL)


def test_stop_never_signals_a_recycled_pid(tmp_path: Path) -> None:
    """A PID file whose PID now belongs to another process (here: this test) is only removed."""
    table = ProcessTable(tmp_path)
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "old.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "name": "old",
                "pid": os.getpid(),
                "start_ticks": start_ticks(os.getpid()) + 1,
                "argv": ["flower-superlink"],
                "log": str(tmp_path / "old.log"),
            }
        )
    )
    assert table.stop("old", timeout=1) is False
    assert not (tmp_path / "pids" / "old.json").exists()


def test_starting_a_name_that_is_running_is_refused(tmp_path: Path) -> None:
    from serforget.deploy.processes import ProcessError

    table = ProcessTable(tmp_path)
    table.start(name="sleeper", argv=[sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ))
    try:
        with pytest.raises(ProcessError, match="already running"):
            table.start(name="sleeper", argv=[sys.executable, "-c", "pass"], env=dict(os.environ))
    finally:
        table.stop_all(timeout=5)


# ------------------------------------------------------------------ write failures


def _restricted(
    code: str, *, max_file_bytes: int | None = None, read_only_dirs: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess:
    """Run ``code`` in a child that cannot write as much as it wants (disk full) or where it wants."""

    def limit() -> None:
        if max_file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    argv = [sys.executable, "-c", textwrap.dedent(code)]
    if read_only_dirs and os.geteuid() == 0:
        # root ignores file modes: drop the capabilities that bypass them for the child
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all", *argv]
    modes = {d: stat.S_IMODE(d.stat().st_mode) for d in read_only_dirs}
    for d in read_only_dirs:
        d.chmod(0o555)
    try:
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, preexec_fn=limit, check=False)
    finally:
        for d, mode in modes.items():
            d.chmod(mode)


@pytest.fixture
def published(tmp_path: Path):
    """A server dir with release v1 of a tiny model, and the v1 manifest bytes."""
    from serforget.common.labels import FOUR_CLASS
    from serforget.common.models import build_model
    from serforget.server.federation import ServerDir, publish_release

    server = ServerDir(tmp_path / "server").init()
    model = build_model(arch="logmel_cnn", config={"channels": [8, 16], "hidden": 16}, labels=FOUR_CLASS)
    publish_release(server=server, model=model, labels=FOUR_CLASS, parent=None, onnx=False)
    return server


def _publish_v2_code(server_root: Path) -> str:
    return f"""
        import torch
        from pathlib import Path
        from serforget.server.federation import ServerDir, publish_release
        from serforget.common.labels import FOUR_CLASS
        from serforget.common.models import build_model
        torch.manual_seed(1)
        model = build_model(arch="logmel_cnn", config={{"channels": [8, 16], "hidden": 16}}, labels=FOUR_CLASS)
        publish_release(server=ServerDir(Path({str(server_root)!r})), model=model, labels=FOUR_CLASS, parent=1,
                        applied_request_ids=["req-x"], revoke_previous=True, onnx=False)
    """


def _assert_only_v1(server) -> None:
    from serforget.common.keys import load_signing_public
    from serforget.common.release import ReleaseRegistry

    registry = ReleaseRegistry(server.releases)
    key = load_signing_public(server.keys_dir / "sign.pub")
    assert registry.versions() == [1]
    assert registry.verify(1, public_key=key).version == 1
    assert registry.latest(public_key=key).version == 1 and registry.revoked() == {}
    assert registry.read_index(public_key=key).releases[0].version == 1


def test_disk_full_while_publishing_a_release_keeps_the_previous_release(published, tmp_path: Path) -> None:
    before = sorted(p.name for p in published.releases.rglob("*"))
    # the tiny model's weights are ~9 kB: they cannot be written under a 4 kB file-size limit
    result = _restricted(_publish_v2_code(published.root), max_file_bytes=4096)
    assert result.returncode != 0 and "File too large" in result.stderr, result.stderr
    _assert_only_v1(published)
    after = sorted(p.name for p in published.releases.rglob("*") if not p.name.startswith(".staging-"))
    assert after == before


def test_permission_error_while_publishing_a_release_keeps_the_previous_release(published) -> None:
    result = _restricted(_publish_v2_code(published.root), read_only_dirs=(published.releases,))
    assert result.returncode != 0 and "Permission denied" in result.stderr, result.stderr
    _assert_only_v1(published)
    # once the folder is writable again the same publish succeeds as v2
    ok = _restricted(_publish_v2_code(published.root))
    assert ok.returncode == 0, ok.stderr


@pytest.fixture
def device(tiny_corpus: Path, tmp_path: Path) -> Path:
    """A device data dir with one deletion request already filed."""
    speaker, utts = next(iter(by_speaker(read_manifest(tiny_corpus)).items()))
    node = prepare_node_dir(root=tmp_path / "device", node_id="node-spk0", speaker=speaker, utterances=utts)
    file_deletion_request(data_dir=node.root, utt_ids=["spk0_happy_0"])
    return node.root


def _forget_code(data_dir: Path) -> str:
    return f"""
        import sys
        from serforget.cli import main
        sys.exit(main(["node", "forget", "--data-dir", {str(data_dir)!r}, "--utt", "spk0_sad_1"]))
    """


def _ledger_snapshot(data_dir: Path) -> list[tuple]:
    with Ledger(data_dir / "ledger.sqlite") as ledger:
        return [(r.request_id, r.state, tuple(r.utt_ids)) for r in ledger.all()]


def test_disk_full_while_writing_the_ledger_reports_and_keeps_earlier_requests(device: Path) -> None:
    before = _ledger_snapshot(device)
    result = _restricted(_forget_code(device), max_file_bytes=1024)
    assert result.returncode == 2 and "ledger.sqlite" in result.stderr, result.stderr
    assert _ledger_snapshot(device) == before
    assert _restricted(_forget_code(device)).returncode == 0
    assert len(_ledger_snapshot(device)) == len(before) + 1


def test_permission_error_while_writing_the_ledger_reports_and_keeps_earlier_requests(device: Path) -> None:
    before = _ledger_snapshot(device)
    ledger_files = [p for p in device.iterdir() if p.name.startswith("ledger.sqlite")]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in ledger_files}
    for p in ledger_files:
        p.chmod(0o444)
    try:
        result = _restricted(_forget_code(device), read_only_dirs=(device,))
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert result.returncode != 0 and "ledger.sqlite" in (result.stderr + result.stdout), result.stderr
    assert _ledger_snapshot(device) == before


_DETACHED = (
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
    "start_new_session=True); time.sleep(120)"
)


def test_stop_also_ends_a_helper_detached_into_its_own_session(tmp_path: Path) -> None:
    """flower-superlink detaches flower-superexec (and so the ServerApp): stop must still end it."""
    table = ProcessTable(tmp_path)
    process = table.start(name="detaching", argv=[sys.executable, "-c", _DETACHED], env=dict(os.environ))
    try:
        deadline = time.monotonic() + 30
        while len(process.members()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        helper = next(pid for pid in process.members() if pid != process.pid)
        assert os.getpgid(helper) != process.pid
        table.stop("detaching", timeout=10)
        assert start_ticks(helper) is None or Path(f"/proc/{helper}/stat").read_text().split(")")[1].split()[0] == "Z"
    finally:
        process.signal(signal.SIGKILL)


def _fake_supernode_list(replies: list[str]):
    """A stand-in for the ``flwr`` CLI that answers ``supernode list`` from ``replies`` in order."""
    calls = []

    def fake(deployment, args, *, timeout):
        calls.append(list(args))
        return subprocess.CompletedProcess(args, 0, stdout=replies[min(len(calls), len(replies)) - 1], stderr="")

    return fake, calls


_UNAVAILABLE = json.dumps(
    {"success": False, "error-message": "Connection to the SuperLink is unavailable. Please check..."}
)


def test_waiting_for_nodes_outlasts_a_superlink_that_is_still_starting(tmp_path: Path, monkeypatch) -> None:
    import serforget.deploy.local as local

    online = json.dumps(
        {"success": True, "nodes": [{"node-id": 7, "status": "online"}, {"node-id": 9, "status": "offline"}]}
    )
    both = json.dumps(
        {"success": True, "nodes": [{"node-id": 7, "status": "online"}, {"node-id": 9, "status": "online"}]}
    )
    fake, calls = _fake_supernode_list([_UNAVAILABLE, _UNAVAILABLE, online, both])
    monkeypatch.setattr(local, "flwr", fake)
    monkeypatch.setattr(local.time, "sleep", lambda s: None)
    local.wait_online(local.Deployment(tmp_path), {7, 9}, timeout=60)
    assert len(calls) == 4


def test_waiting_for_nodes_gives_up_with_the_last_error_and_refuses_other_failures(tmp_path: Path, monkeypatch) -> None:
    import serforget.deploy.local as local

    fake, _ = _fake_supernode_list([_UNAVAILABLE])
    monkeypatch.setattr(local, "flwr", fake)
    monkeypatch.setattr(local.time, "sleep", lambda s: None)
    with pytest.raises(local.DeployError, match=r"(?s)SuperNodes \[7\] to be online.*unavailable"):
        local.wait_online(local.Deployment(tmp_path), {7}, timeout=0)
    denied = json.dumps({"success": False, "error-message": "Permission denied"})
    fake, calls = _fake_supernode_list([denied, denied])
    monkeypatch.setattr(local, "flwr", fake)
    with pytest.raises(local.DeployError, match="Permission denied"):
        local.wait_online(local.Deployment(tmp_path), {7}, timeout=60)
    assert len(calls) == 1  # not retried: only an unreachable SuperLink is worth waiting for
