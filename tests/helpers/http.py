"""HTTP servers on 127.0.0.1 in daemon threads, shut down and joined when a test ends."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


class ThreadedServers:
    """``start(server) -> "http://127.0.0.1:PORT"`` runs a bound server; ``stop_all()`` ends every one."""

    def __init__(self) -> None:
        self._running: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(self, server: ThreadingHTTPServer) -> str:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        thread.start()
        self._running.append((server, thread))
        host, port = server.server_address[:2]
        return f"http://{host}:{port}"

    def stop_all(self) -> None:
        for server, thread in self._running:
            server.shutdown()
            server.server_close()
            thread.join()
        self._running.clear()
