"""``python -m serforget.deploy.superlink``: Flower's SuperLink with the Fleet API alone on the devices' port.

Why: flwr 1.41 serves the Fleet API (devices), the Control API (``flwr run``, ``flwr supernode
register``) and the Runtime/ServerAppIo API (the ServerApp) on **one** HTTPS port, and the Control
API has no authentication in the open-source SuperLink. Anyone who can reach that port and holds
``ca.crt`` (every device does) can register SuperNode keys and start a ServerApp of their own,
which runs on the SuperLink host with the release-signing key in reach. ``flower-superlink`` has
no flag to split the APIs (``--control-api-address`` and ``--fleet-api-address`` are deprecated
and ignored for HTTP), so this launcher builds the very same FastAPI app with flwr's own argument
parsing and lifespan and serves it from **two sockets** of one uvicorn server:

- the operator socket, flower's ``--host``/``--port`` (default 127.0.0.1): every API, as
  ``flower-superlink`` would serve them; the ServerApp's SuperExec dials the Runtime API here;
- the Fleet socket, ``--fleet-host``/``--fleet-port``: only the exact Fleet API paths of flwr's
  Fleet router (``/v1/fleet/...``); any other request there is answered 404 before it reaches
  Flower. Which socket a request came in on is the connection's local address
  (ASGI ``scope["server"]``), which the client cannot forge.

Both sockets use the same TLS certificate, so it must name the operator host too
(``serforget.deploy.local.create_pki`` adds it). Every other argument is passed to flwr unchanged.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any, Awaitable, Callable, Sequence

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def fleet_paths() -> frozenset[str]:
    """The exact request paths of flwr's Fleet router (what a SuperNode calls)."""
    from flwr.superlink.routers.fleet.router import router

    return frozenset(route.path for route in router.routes)


class FleetOnlySocket:
    """ASGI wrapper: requests arriving on ``fleet_port`` reach ``app`` only for an allowed path.

    Exact string match on ``scope["path"]`` (already percent-decoded by uvicorn): no prefix test,
    so ``/v1/fleet/../control/...`` or ``/v1/fleet-x`` is refused like any other path.
    """

    def __init__(self, app: ASGIApp, *, fleet_port: int, allowed: frozenset[str]) -> None:
        self.app = app
        self.fleet_port = fleet_port
        self.allowed = allowed

    async def __call__(self, scope: dict, receive, send) -> None:
        if (
            scope["type"] in ("http", "websocket")
            and self._on_fleet_socket(scope)
            and scope.get("path") not in self.allowed
        ):
            await self._refuse(scope, send)
            return
        await self.app(scope, receive, send)

    def _on_fleet_socket(self, scope: dict) -> bool:
        server = scope.get("server")
        # no local address (not a TCP socket): treat as the public socket, i.e. refuse
        return server is None or int(server[1]) == self.fleet_port

    @staticmethod
    async def _refuse(scope: dict, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": "not served on the Fleet port"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as exc:
        raise SystemExit(f"serforget.deploy.superlink: cannot listen on {host}:{port}: {exc.strerror}") from None


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our two flags; the rest are ``flower-superlink`` flags."""
    parser = argparse.ArgumentParser(
        prog="python -m serforget.deploy.superlink", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--fleet-host", required=True, help="address the devices dial (e.g. 0.0.0.0)")
    parser.add_argument("--fleet-port", type=int, required=True, help="port of the Fleet API (devices)")
    return parser.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags with flwr's own parser, build flwr's app, serve it on the two sockets."""
    import importlib

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    # the package re-exports a function of the same name, so import the module by its full name
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    ours, rest = parse_args(sys.argv[1:] if argv is None else argv)
    sys.argv = ["flower-superlink", *rest]
    config = fs._parse_superlink_lifespan_config()
    if config.ssl_certfile is None:
        raise SystemExit("serforget.deploy.superlink: TLS is required (--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile)")
    if int(ours.fleet_port) == int(config.port):
        raise SystemExit(
            f"serforget.deploy.superlink: --fleet-port {ours.fleet_port} must differ from the operator --port"
        )
    app = FleetOnlySocket(create_app(config, fs.SuperLinkLifespan), fleet_port=ours.fleet_port, allowed=fleet_paths())
    sockets = [_listen(config.host, config.port), _listen(ours.fleet_host, ours.fleet_port)]
    server_config: Any = uvicorn.Config(
        app=app,
        host=config.host,
        port=config.port,
        reload=False,
        access_log=True,
        proxy_headers=False,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        workers=1,
        lifespan="on",
    )
    print(
        f"serforget.deploy.superlink: Fleet API on {ours.fleet_host}:{ours.fleet_port}; Control and Runtime APIs on "
        f"{config.host}:{config.port} only",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(server_config).run(sockets=sockets)


if __name__ == "__main__":
    main()
