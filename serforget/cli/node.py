"""``serforget node forget|status``: what a speaker (or the device UI) uses to delete recordings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="a device's deletion requests")
    nsub = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    forget = nsub.add_parser("forget", help="record a deletion request (idempotent, durable)")
    forget.add_argument("--data-dir", type=Path, required=True, help="the node's data directory")
    which = forget.add_mutually_exclusive_group(required=True)
    which.add_argument("--utt", nargs="+", metavar="ID", help="utterance ids to delete")
    which.add_argument("--all", action="store_true", help="delete every recording of this speaker")
    forget.set_defaults(handler=_forget)
    status = nsub.add_parser("status", help="list the node's deletion requests and their states")
    status.add_argument("--data-dir", type=Path, required=True)
    status.set_defaults(handler=_status)


def _forget(args: argparse.Namespace) -> int:
    from serforget.client.node import file_deletion_request

    request = file_deletion_request(data_dir=args.data_dir, utt_ids=args.utt, whole_speaker=args.all)
    print(
        json.dumps(
            {
                "request_id": request.request_id,
                "state": request.state,
                "utt_ids": list(request.utt_ids),
                "whole_speaker": request.whole_speaker,
            },
            indent=2,
        )
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from serforget.client.node import NodeDir

    with NodeDir(args.data_dir).open_ledger() as ledger:
        rows = [
            {
                "request_id": r.request_id,
                "state": r.state,
                "n_utts": len(r.utt_ids),
                "whole_speaker": r.whole_speaker,
                "release_version": r.release_version,
            }
            for r in ledger.all()
        ]
    print(json.dumps(rows, indent=2))
    return 0
