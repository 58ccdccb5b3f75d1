"""The release HTTP server: serves a registry's signed index and non-revoked releases to edge devices.

Why in ``server/``: only the aggregator's host serves releases; the registry format and its
verification stay in :mod:`serforget.common.release`, which the edge client uses too (the
edge venv has neither torch nor Flower, and this module needs neither). Every answer is read
from the live registry, so a revocation stops a release being served (410 Gone) at once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from serforget.common.release import (
    INDEX_NAME,
    INDEX_SIGNATURE_NAME,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ReleaseError,
    ReleaseRegistry,
    parse_version_dirname,
    version_dirname,
)

logger = logging.getLogger(__name__)

#: Bytes per read when streaming a release file.
_COPY_CHUNK = 1 << 20

_RELEASE_URL_RE = re.compile(r"/(v\d{4,})/([^/]+)")
_ROTATION_URL_RE = re.compile(r"/root/r(\d{6})\.json")


class _ReleaseRequestHandler(BaseHTTPRequestHandler):
    """Serves the index and the files of non-revoked releases; every other path is 404.

    Paths are matched against an allow-list (the index names, and for a release its manifest,
    signature and the files its manifest lists), never joined onto the file system as given,
    so ``..``, encoded separators or absolute paths cannot reach anything else.
    """

    server_version = "serforget-releases/1"

    def __init__(self, *args: Any, registry: ReleaseRegistry, **kwargs: Any) -> None:
        self.registry = registry
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 - name fixed by http.server
        route = self.path.split("?", 1)[0]
        try:
            if route in ("/" + INDEX_NAME, "/" + INDEX_SIGNATURE_NAME):
                self._send_index_part(signature=route.endswith(".sig"))
                return
            rotation = _ROTATION_URL_RE.fullmatch(route)
            if rotation is not None:
                key_version = int(rotation.group(1))
                data = self.registry.read_rotation(key_version) if key_version >= 2 else None
                if data is None:
                    self._send_text(HTTPStatus.NOT_FOUND, "no such key version")
                else:
                    self._send_bytes(data, content_type="application/json")
                return
            match = _RELEASE_URL_RE.fullmatch(route)
            version = parse_version_dirname(match.group(1)) if match else None
            if match is None or version is None or version not in self.registry.versions():
                self._send_text(HTTPStatus.NOT_FOUND, "not found")
                return
            self._send_release_file(version, match.group(2))
        except ReleaseError as exc:
            logger.error("cannot serve %s: %s", route, exc)
            self._send_text(HTTPStatus.INTERNAL_SERVER_ERROR, "release store damaged")

    def _send_index_part(self, *, signature: bool) -> None:
        if not self.registry.has_index():
            self._send_text(HTTPStatus.NOT_FOUND, "nothing published")
            return
        index_bytes, signature_bytes = self.registry.read_index_files()
        self._send_bytes(signature_bytes if signature else index_bytes, content_type="application/json")

    def _send_release_file(self, version: int, name: str) -> None:
        revoked = self.registry.revoked()
        if version in revoked:
            self._send_text(HTTPStatus.GONE, f"release {version_dirname(version)} is revoked: {revoked[version]}")
            return
        allowed = set(self.registry.manifest(version).files) | {MANIFEST_NAME, SIGNATURE_NAME}
        if name not in allowed:
            self._send_text(HTTPStatus.NOT_FOUND, "not found")
            return
        path = self.registry.path(version) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ReleaseError(f"{path}: cannot open ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as handle:
            self._send_stream(handle, size=os.fstat(fd).st_size)

    def _send_stream(self, handle: BinaryIO, *, size: int) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        shutil.copyfileobj(handle, self.wfile, _COPY_CHUNK)

    def _send_bytes(self, data: bytes, *, content_type: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, status: HTTPStatus, message: str) -> None:
        body = (message + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by http.server
        logger.info("%s - %s", self.address_string(), format % args)


def serve_releases(*, root: Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server (not yet running) for the registry at ``root``; the caller runs ``serve_forever()``.

    Revocation is checked on every request against the live log, so a revoked release stops
    being served (410 Gone) immediately, even before clients see a new index. ``port=0`` binds
    an ephemeral port (read it from ``serforget.server.server_address``).
    """
    handler = partial(_ReleaseRequestHandler, registry=ReleaseRegistry(Path(root)))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
