"""The tiny federated scenario the in-process ServerApp tests run (seconds, not minutes)."""

from __future__ import annotations

import json

TINY = {
    "synth-speakers": 6,
    "synth-sentences": 2,
    "synth-takes": 1,
    "valid-speakers": 1,
    "test-speakers": 1,
    "num-rounds": 2,
    "local-epochs": 1,
    "batch-size": 8,
    "clip-seconds": 2.0,
    "onnx-export": False,
    "scenario-partial-n": 3,
    "scenario-partial-node": 0,
    "scenario-whole-node": 1,
    "importance-max-utts": 8,
    "model-json": json.dumps({"channels": [8, 16], "hidden": 16}),
    "unlearn-json": json.dumps({"max_epochs": 5, "pgd_k": 1, "pgd_steps": 3}),
    # one validation speaker: a single flipped utterance is 12.5 UA points, so the held-out gate is
    # switched off here and tested on its own below
    "max-ua-drop": 100.0,
}
