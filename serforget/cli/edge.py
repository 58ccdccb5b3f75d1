"""``serforget export-onnx``, ``serforget edge pull|predict`` and ``serforget server serve-releases``.

Why heavy imports live inside the handlers: ``edge pull`` and ``edge predict`` run on devices
without torch, so registering these commands must not import torch (only the server-side
``export-onnx`` handler does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serforget.cli._args import add_progress


def register(sub: argparse._SubParsersAction) -> None:
    _register_export(sub)
    _register_edge(sub)
    _register_server(sub)


def _register_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export-onnx", help="export a checkpoint to ONNX (parity-checked; optional int8)")
    export.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (model.json + weights)")
    export.add_argument(
        "--out", type=Path, required=True, help="folder for model.onnx, model.int8.onnx, onnx_report.json"
    )
    export.add_argument(
        "--int8",
        action="store_true",
        help="also quantize to int8 (kept only within --max-ua-drop and at least --min-int8-speedup x fp32)",
    )
    export.add_argument("--parity-manifest", type=Path, help="labelled manifest of real audio for parity and UA")
    export.add_argument("--release-version", type=int, help="release number recorded in the ONNX metadata")
    export.add_argument("--max-ua-drop", type=float, default=1.0, help="largest int8 UA drop in points (default 1.0)")
    export.add_argument(
        "--min-int8-speedup",
        type=float,
        default=1.1,
        help="speed int8 must reach, as a multiple of fp32 (one thread, batch 1; default 1.1)",
    )
    export.add_argument(
        "--calibration-manifest",
        type=Path,
        help="training audio to calibrate static int8 on (default: synthetic probe signals)",
    )
    export.add_argument("--atol", type=float, default=1e-4, help="largest allowed |logit difference| (default 1e-4)")
    export.set_defaults(handler=_export)


def _register_edge(sub: argparse._SubParsersAction) -> None:
    edge = sub.add_parser("edge", help="edge device: pull signed releases, predict with ONNX Runtime")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True, metavar="EDGE_COMMAND")

    pull = edge_sub.add_parser("pull", help="install the newest signed, non-revoked release")
    pull.add_argument("--from", dest="source", required=True, help="registry folder or http(s):// URL")
    pull.add_argument("--to", dest="dest", type=Path, required=True, help="local edge folder")
    pull.add_argument("--server-key", type=Path, required=True, help="pinned server Ed25519 public key (sign.pub)")
    pull.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds each HTTP file may take on top of its size at --min-rate (default 60)",
    )
    pull.add_argument(
        "--min-rate",
        type=float,
        default=64.0,
        help="slowest average download rate in KiB/s before a file's deadline cuts it off (default 64)",
    )
    pull.add_argument(
        "--min-sequence",
        type=int,
        default=0,
        help="trust anchor of a fresh device: oldest index sequence to accept (default 0)",
    )
    add_progress(pull)
    pull.set_defaults(handler=_pull)

    predict = edge_sub.add_parser("predict", help="emotion of audio files, as JSON (ONNX Runtime only)")
    predict.add_argument("--model", type=Path, required=True, help="pulled edge folder, release folder or .onnx file")
    predict.add_argument("files", type=Path, nargs="+", metavar="FILE")
    predict.add_argument("--int8", action="store_true", help="run the int8 model of the release")
    predict.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    predict.add_argument("--hop-seconds", type=float, help="window hop for long files (default: half a window)")
    predict.set_defaults(handler=_predict)


def _register_server(sub: argparse._SubParsersAction) -> None:
    server = sub.add_parser("server", help="server-side services")
    server_sub = server.add_subparsers(dest="server_command", required=True, metavar="SERVER_COMMAND")
    serve = server_sub.add_parser("serve-releases", help="serve the release registry over HTTP")
    serve.add_argument("--root", type=Path, required=True, help="release registry folder")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.set_defaults(handler=_serve)
    refresh = server_sub.add_parser("refresh-index", help="re-sign the release index with a new expiry (run daily)")
    refresh.add_argument("--root", type=Path, required=True, help="release registry folder")
    refresh.add_argument("--key", type=Path, required=True, help="the server's Ed25519 signing key (sign.key)")
    refresh.add_argument(
        "--lifetime-days", type=float, default=7.0, help="days until the new index expires (default 7)"
    )
    refresh.set_defaults(handler=_refresh)
    rotate = server_sub.add_parser("rotate-key", help="move the release registry to a new signing key")
    rotate.add_argument("--root", type=Path, required=True, help="release registry folder")
    rotate.add_argument(
        "--pinned", type=Path, required=True, help="the sign.pub devices were provisioned with (key version 1)"
    )
    rotate.add_argument("--old-key", type=Path, required=True, help="the current signing key (sign.key)")
    rotate.add_argument(
        "--new-key", type=Path, required=True, help="the new signing key; install it as sign.key afterwards"
    )
    rotate.set_defaults(handler=_rotate)


def _export(args: argparse.Namespace) -> int:
    from serforget.common.onnx_export import REPORT_FILE, export_release_models

    files = export_release_models(
        checkpoint_dir=args.checkpoint,
        out_dir=args.out,
        parity_manifest=args.parity_manifest,
        release_version=args.release_version,
        int8=args.int8,
        max_ua_drop=args.max_ua_drop,
        atol=args.atol,
        min_int8_speedup=args.min_int8_speedup,
        calibration_manifest=args.calibration_manifest,
    )
    report = json.loads(files[REPORT_FILE].read_text(encoding="utf-8"))
    summary = {
        "files": {name: str(path) for name, path in files.items()},
        "parity": report["fp32"]["parity"],
        "int8": report["int8"],
    }
    print(json.dumps(summary, indent=2))
    return 0


def _pull(args: argparse.Namespace) -> int:
    from serforget.common.edge.pull import pull_release
    from serforget.common.keys import load_signing_public

    result = pull_release(
        source=args.source,
        dest=args.dest,
        server_public_key=load_signing_public(args.server_key),
        timeout_s=args.timeout,
        min_rate=args.min_rate * 1024,
        min_sequence=args.min_sequence,
        progress=args.progress,
    )
    print(
        json.dumps(
            {
                "version": result.version,
                "path": str(result.path),
                "changed": result.changed,
                "removed_revoked": result.removed_revoked,
            },
            indent=2,
        )
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from serforget.common.edge.predict import predict_files

    run = predict_files(
        model=args.model,
        files=args.files,
        precision="int8" if args.int8 else "fp32",
        threads=args.threads,
        hop_seconds=args.hop_seconds,
    )
    print(json.dumps(run.to_dict(), indent=2))
    return 0


def _refresh(args: argparse.Namespace) -> int:
    from serforget.common.keys import load_signing_private
    from serforget.common.release import ReleaseRegistry

    if not args.root.is_dir():
        raise FileNotFoundError(f"{args.root}: release registry folder not found")
    index = ReleaseRegistry(args.root).refresh_index(
        signing_key=load_signing_private(args.key), lifetime_s=args.lifetime_days * 86400.0
    )
    print(json.dumps({"sequence": index.sequence, "expires": index.expires, "releases": len(index.releases)}, indent=2))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from serforget.common.keys import load_signing_private, load_signing_public
    from serforget.common.release import ReleaseRegistry

    if not args.root.is_dir():
        raise FileNotFoundError(f"{args.root}: release registry folder not found")
    version = ReleaseRegistry(args.root).rotate_key(
        pinned=load_signing_public(args.pinned),
        old_signing_key=load_signing_private(args.old_key),
        new_signing_key=load_signing_private(args.new_key),
    )
    print(json.dumps({"key_version": version}, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from serforget.server.release_http import serve_releases

    if not args.root.is_dir():
        raise FileNotFoundError(f"{args.root}: release registry folder not found")
    server = serve_releases(root=args.root, host=args.host, port=args.port)
    host, port = server.server_address[:2]
    print(f"serving releases from {args.root} at http://{host}:{port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
