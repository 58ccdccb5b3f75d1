"""Provisioning of the default simulated federation (one machine plays every device).

Idempotent, separate from training: synthesize (or reuse) the corpus, split it by speaker, give
every training speaker a node data directory with its own audio copy and keys, create the
server's keys, enroll every node's signing key and pin the server's HPKE and release-signing
public keys on every node. In a real deployment each of these steps happens on its own host (see docs/deployment.md).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from serforget.client.node import NodeDir, pin_server_keys, prepare_node_dir
from serforget.common.corpora.synth import SynthConfig, synthesize_corpus
from serforget.common.manifest import SplitSpec, by_speaker, read_manifest
from serforget.common.pipeline import make_splits, training_speakers
from serforget.server.federation import ServerDir


class NodeSource(Protocol):
    """What ``require_partition_nodes`` needs of Flower's Grid (this module stays free of flwr imports)."""

    def get_node_ids(self) -> Iterable[int]: ...


#: how long a simulated ServerApp waits for its SuperNodes before refusing the run
NODE_WAIT_S = 60.0


@dataclass(frozen=True)
class SimulationLayout:
    root: Path
    splits: dict[str, Path]
    speakers: tuple[str, ...]
    server: ServerDir

    def node_dir(self, partition_id: int) -> NodeDir:
        if not 0 <= partition_id < len(self.speakers):
            raise ValueError(f"partition-id {partition_id} outside the {len(self.speakers)} speaker nodes")
        return NodeDir(self.root / "nodes" / f"{partition_id:03d}")


def node_id_for(speaker: str) -> str:
    """A node id that fits the envelope's identifier alphabet (no ``_``, no spaces)."""
    return "node-" + re.sub(r"[^A-Za-z0-9.:@-]", "-", speaker)


def provision_simulation(
    *,
    root: Path,
    synth: SynthConfig = SynthConfig(),
    task: str = "4class",
    split: SplitSpec = SplitSpec(),
    progress: bool = True,
    manifest: Path | None = None,
) -> SimulationLayout:
    """Create (or reuse) everything a simulated run needs under ``root``.

    ``manifest``: an indexed corpus to split instead of the synthetic one (``synth`` is then
    unused). Its training speakers are exactly ``common.pipeline.training_speakers``' answer,
    which is how ``serforget simulate`` sizes the simulation beforehand.
    """
    root = Path(root)
    if manifest is None:
        manifest = synthesize_corpus(out_dir=root / "corpus", config=synth, progress=progress)
    else:
        training_speakers(manifest=manifest, task=task, split=split)  # clear errors first
    splits = make_splits(manifest=manifest, out_dir=root / "splits", task=task, split=split)
    server = ServerDir(root / "server").init()
    partitions = by_speaker(read_manifest(splits["train"]))
    layout = SimulationLayout(root, splits, tuple(partitions), server)
    for pid, (speaker, utts) in enumerate(partitions.items()):
        node = prepare_node_dir(
            root=layout.node_dir(pid).root, node_id=node_id_for(speaker), speaker=speaker, utterances=utts
        )
        server.enroll(node_id=node.node_id, public_key_path=node.keys_dir / "sign.pub")
        pin_server_keys(node, server_keys_dir=server.keys_dir)
    return layout


def require_partition_nodes(
    grid: NodeSource, *, n_partitions: int, timeout: float = NODE_WAIT_S, poll: float = 1.0
) -> list[int]:
    """The simulation's node ids, once exactly one SuperNode per partition is connected.

    Why: a plain ``flwr run .`` uses the connection's ``num-supernodes`` (Flower's default is
    2), which knows nothing of the speaker partition; with fewer nodes FedAvg would wait forever
    for the rest, with more a node would find no partition. Both numbers are named so the user
    can fix the connection config (or use ``serforget simulate``, which sizes it).
    """
    deadline = time.monotonic() + timeout
    ids = list(grid.get_node_ids())
    while len(ids) < n_partitions and time.monotonic() < deadline:
        time.sleep(poll)
        ids = list(grid.get_node_ids())
    if len(ids) != n_partitions:
        raise ValueError(
            f"the simulation has {len(ids)} SuperNodes connected (after waiting up to {timeout:.0f} s) but the corpus "
            f"has {n_partitions} training-speaker partitions: set num-supernodes = {n_partitions} in the Flower "
            f"connection (options.num-supernodes in $FLWR_HOME/config.toml) or run `serforget simulate`, which sets it"
        )
    return ids
