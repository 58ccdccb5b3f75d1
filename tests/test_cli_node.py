from pathlib import Path

from serforget.cli import main
from serforget.client.ledger import Ledger
from serforget.client.node import prepare_node_dir
from serforget.common.manifest import read_manifest


def test_node_forget_cli_is_idempotent_and_validates(tiny_corpus: Path, tmp_path: Path, capsys) -> None:
    utts = [u for u in read_manifest(tiny_corpus) if u.speaker == "spk0"]
    node = prepare_node_dir(root=tmp_path / "node", node_id="node-spk0", speaker="spk0", utterances=utts)
    assert main(["node", "forget", "--data-dir", str(node.root), "--utt", utts[0].utt_id, utts[1].utt_id]) == 0
    assert main(["node", "forget", "--data-dir", str(node.root), "--utt", utts[1].utt_id, utts[0].utt_id]) == 0
    with Ledger(node.ledger_path) as ledger:
        assert len(ledger.all()) == 1 and ledger.all()[0].state == "pending"
    assert main(["node", "forget", "--data-dir", str(node.root), "--utt", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["node", "forget", "--data-dir", str(node.root), "--all"]) == 0
    with Ledger(node.ledger_path) as ledger:
        assert ledger.forgotten_utt_ids() == {u.utt_id for u in utts}
    assert main(["node", "status", "--data-dir", str(node.root)]) == 0
    assert main(["node", "forget", "--data-dir", str(tmp_path / "missing"), "--all"]) == 2


def test_keys_cli(tmp_path: Path, capsys) -> None:
    assert main(["keys", "init", "--dir", str(tmp_path / "srv"), "--role", "server"]) == 0
    assert main(["keys", "init", "--dir", str(tmp_path / "n1"), "--role", "node"]) == 0
    assert (tmp_path / "srv" / "hpke.pub").exists() and not (tmp_path / "n1" / "hpke.pub").exists()
    reg = tmp_path / "srv" / "nodes.json"
    assert (
        main(
            [
                "keys",
                "enroll",
                "--registry",
                str(reg),
                "--node-id",
                "n1",
                "--public-key",
                str(tmp_path / "n1" / "sign.pub"),
            ]
        )
        == 0
    )
    assert main(["keys", "init", "--dir", str(tmp_path / "n2"), "--role", "node"]) == 0
    assert (
        main(
            [
                "keys",
                "enroll",
                "--registry",
                str(reg),
                "--node-id",
                "n1",
                "--public-key",
                str(tmp_path / "n2" / "sign.pub"),
            ]
        )
        == 2
    )


def test_deploy_cli_without_a_deployment(tmp_path: Path, capsys) -> None:
    assert main(["deploy", "run", "--run-dir", str(tmp_path)]) == 2
    assert "serforget deploy up" in capsys.readouterr().err
    assert main(["deploy", "down", "--run-dir", str(tmp_path)]) == 0
    assert "nothing was running" in capsys.readouterr().out
