"""``serforget unlearn`` / ``unlearn-eval`` end to end on a tiny manifest of tone recordings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from serforget.cli import main
from serforget.common.checkpoint import load_checkpoint, save_checkpoint
from serforget.common.manifest import Utterance, write_manifest
from tests.helpers.unlearning import LABELS, tone_set, trained_tiny


def _write_corpus(root: Path) -> Path:
    """Tone recordings of 4 speakers x 4 classes x 3 takes as WAV files plus a manifest."""
    utts = []
    for s in range(4):
        data = tone_set(3, seed=10 + s, prefix=f"s{s}_", speaker=f"spk{s}")
        for wave, target, utt_id in zip(data.waves, data.targets.tolist(), data.utt_ids):
            path = root / "wav" / f"{utt_id}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, wave.numpy(), 16_000)
            utts.append(Utterance(utt_id, path, f"spk{s}", LABELS[target]))
    return write_manifest(root / "manifest.csv", utts)


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    manifest = _write_corpus(tmp_path / "corpus")
    model, _, _ = trained_tiny()
    ckpt = save_checkpoint(
        model=model, out_dir=tmp_path / "original", labels=LABELS, provenance={"settings": {"clip_seconds": 0.25}}
    )
    return manifest, ckpt


def test_unlearn_writes_an_unlearned_checkpoint_with_provenance(corpus, tmp_path, capsys):
    manifest, ckpt = corpus
    forget = tmp_path / "forget.csv"
    from serforget.common.manifest import read_manifest

    write_manifest(forget, read_manifest(manifest)[:4])
    out = tmp_path / "unlearned"
    argv = [
        "unlearn",
        "--checkpoint",
        str(ckpt),
        "--forget-manifest",
        str(forget),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--set",
        "max_epochs=2",
        "--set",
        "pgd_steps=1",
        "--set",
        "pgd_k=1",
    ]
    assert main(argv) == 0
    assert "forgot 4 utterances" in capsys.readouterr().out
    model, meta = load_checkpoint(out)
    record = meta.provenance["unlearning"]
    assert record["method"] == "rl_adv_ela" and record["n_forget"] == 4 and record["config"]["max_epochs"] == 2
    assert meta.provenance["source_weights_sha256"] == load_checkpoint(ckpt)[1].weights_sha256
    assert meta.provenance["settings"]["clip_seconds"] == 0.25
    # a second run into the same folder needs --overwrite; the stored checkpoint survives the refusal
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert load_checkpoint(out)[1].weights_sha256 == meta.weights_sha256


def test_unlearn_rejects_baselines_and_writing_over_the_source(corpus, tmp_path, capsys):
    manifest, ckpt = corpus
    assert (
        main(
            [
                "unlearn",
                "--checkpoint",
                str(ckpt),
                "--forget-manifest",
                str(manifest),
                "--out",
                str(tmp_path / "x"),
                "--method",
                "scrub",
            ]
        )
        == 2
    )
    assert "forget-set-only" in capsys.readouterr().err
    assert main(["unlearn", "--checkpoint", str(ckpt), "--forget-manifest", str(manifest), "--out", str(ckpt)]) == 2
    assert "source checkpoint" in capsys.readouterr().err
    assert (
        main(
            [
                "unlearn",
                "--checkpoint",
                str(ckpt),
                "--forget-manifest",
                str(manifest),
                "--out",
                str(tmp_path / "y"),
                "--set",
                "penalty_tau=7",
            ]
        )
        == 2
    )
    assert "penalty_tau: must lie in (0, 1], got 7.0" in capsys.readouterr().err


def test_unlearn_eval_writes_json_markdown_and_plots(corpus, tmp_path, capsys):
    manifest, ckpt = corpus
    forget_list = tmp_path / "forget.txt"
    out = tmp_path / "report"
    # speakers are split 1 valid / 1 test / 2 train; forget two utterances of whichever speakers train
    assert (
        main(
            [
                "unlearn-eval",
                "--checkpoint",
                str(ckpt),
                "--manifest",
                str(manifest),
                "--n-valid",
                "1",
                "--n-test",
                "1",
                "--n-forget",
                "3",
                "--seed",
                "0",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--methods",
                "rl_adv_ela,rl_adv_ela@retrain-level,ft",
                "--retrain-epochs",
                "1",
                "--set",
                "max_epochs=2",
                "--set",
                "pgd_steps=1",
                "--set",
                "remain_epochs=1",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["format_version"] == 1
    methods = [r["method"] for r in report["rows"]]
    assert methods == ["original", "retrain", "rl_adv_ela", "rl_adv_ela@retrain-level", "ft"]
    for row in report["rows"]:
        assert {"forget_acc", "remain_acc", "test_ua", "test_wa", "mia_auc", "gap", "unlearn_s", "retrain_s"} <= set(
            row
        )
        assert row["n_forget"] == 3
    assert next(r for r in report["rows"] if r["method"] == "retrain")["gap"] == 0.0
    assert (out / "report.md").read_text().count("| RL+Adv+Ela") == 2
    assert (out / "metrics.png").stat().st_size > 0 and (out / "cost.png").stat().st_size > 0
    capsys.readouterr()
    # an explicit forget list naming an utterance outside the training split is an error naming it
    forget_list.write_text("# ids\nnot_an_utt\n")
    assert (
        main(
            [
                "unlearn-eval",
                "--checkpoint",
                str(ckpt),
                "--manifest",
                str(manifest),
                "--n-valid",
                "1",
                "--n-test",
                "1",
                "--forget",
                str(forget_list),
                "--out",
                str(out),
                "--no-retrain",
            ]
        )
        == 2
    )
    assert "not_an_utt" in capsys.readouterr().err
