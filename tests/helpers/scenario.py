"""The tiny federated scenario the in-process ServerApp tests run (seconds, not minutes)."""

from __future__ import annotations

TINY = {
    "synth.speakers": 6,
    "synth.sentences": 2,
    "synth.takes": 1,
    "valid-speakers": 1,
    "test-speakers": 1,
    "num-rounds": 2,
    "local-epochs": 1,
    "batch-size": 8,
    "clip-seconds": 2.0,
    "release.onnx-export": False,
    "scenario.partial-n": 3,
    "scenario.partial-node": 0,
    "scenario.whole-node": 1,
    "importance-max-utts": 8,
    "model.channels": "8,16",
    "model.hidden": 16,
    "unlearn.max-epochs": 5,
    "unlearn.pgd-k": 1,
    "unlearn.pgd-steps": 3,
    # one validation speaker: a single flipped utterance is 12.5 UA points, so the held-out gate is
    # switched off here and tested on its own below
    "max-ua-drop": 100.0,
}
