"""``serforget keys init|enroll``: server and node keys, and node enrollment on the server."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="create keys and enroll nodes")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = ksub.add_parser("init", help="create signing (and, for the server, HPKE) keys; idempotent")
    init.add_argument("--dir", type=Path, required=True, help="key folder (e.g. SERVER/keys or NODE/keys)")
    init.add_argument("--role", choices=("server", "node"), required=True)
    init.add_argument("--suite", default="x25519", help="HPKE suite of the server: x25519 or mlkem768-x25519")
    init.set_defaults(handler=_init)
    enroll = ksub.add_parser("enroll", help="trust a node's signing key on the server")
    enroll.add_argument("--registry", type=Path, required=True, help="SERVER/nodes.json")
    enroll.add_argument("--node-id", required=True)
    enroll.add_argument("--public-key", type=Path, required=True, help="the node's sign.pub")
    enroll.add_argument("--replace", action="store_true", help="rotate the key of an enrolled node")
    enroll.set_defaults(handler=_enroll)


def _init(args: argparse.Namespace) -> int:
    from serforget.common.keys import fingerprint, init_keys, load_signing_public

    paths = init_keys(key_dir=args.dir, role=args.role, suite=args.suite)
    print(f"signing key {paths.sign_public} (fingerprint {fingerprint(load_signing_public(paths.sign_public))})")
    if paths.hpke_public is not None:
        print(f"HPKE public key {paths.hpke_public}: pin it on every node as keys/server_hpke.pub")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from serforget.common.keys import enroll_node, fingerprint, load_signing_public

    enroll_node(registry_path=args.registry, node_id=args.node_id, public_key_path=args.public_key, replace=args.replace)
    print(f"enrolled {args.node_id} ({fingerprint(load_signing_public(args.public_key))})")
    return 0
