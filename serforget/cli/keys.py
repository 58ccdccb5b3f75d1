"""``serforget keys init|enroll|revoke``: server and node keys, node enrollment and revocation on the server."""

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
    revoke = ksub.add_parser(
        "revoke", help="stop trusting a node: its envelopes are refused, its key never re-enrolled"
    )
    revoke.add_argument("--registry", type=Path, required=True, help="SERVER/nodes.json")
    revoke.add_argument("--node-id", required=True)
    revoke.add_argument(
        "--deployment",
        type=Path,
        default=None,
        help="a `serforget deploy up` run dir: also unregister the node's SuperNode key from the SuperLink",
    )
    revoke.set_defaults(handler=_revoke)


def _init(args: argparse.Namespace) -> int:
    from serforget.common.keys import fingerprint, init_keys, load_signing_public

    paths = init_keys(key_dir=args.dir, role=args.role, suite=args.suite)
    print(f"signing key {paths.sign_public} (fingerprint {fingerprint(load_signing_public(paths.sign_public))})")
    if paths.hpke_public is not None:
        print(f"HPKE public key {paths.hpke_public}: pin it on every node as keys/server_hpke.pub")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from serforget.common.keys import enroll_node, fingerprint, load_signing_public

    enroll_node(
        registry_path=args.registry, node_id=args.node_id, public_key_path=args.public_key, replace=args.replace
    )
    print(f"enrolled {args.node_id} ({fingerprint(load_signing_public(args.public_key))})")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from serforget.common.keys import revoke_node

    fingerprint = revoke_node(registry_path=args.registry, node_id=args.node_id)
    print(f"revoked {args.node_id} (key {fingerprint}): its envelopes are refused from now on")
    if args.deployment is not None:
        from serforget.cli.deploy import _load
        from serforget.deploy.local import unregister_device

        deployment, _ = _load(args.deployment)
        flower_id = unregister_device(deployment, args.node_id)
        print(
            f"SuperNode key of {args.node_id} "
            + (
                f"unregistered (Flower node {flower_id})"
                if flower_id is not None
                else "was not registered by this deployment"
            )
        )
    return 0
