"""The Fleet-only door of a SuperLink: a TLS reverse proxy that passes SuperNodes' requests and nothing else.

flwr 1.42's SuperLink serves every API on one HTTP server: the Fleet API the SuperNodes use, the Control API
(submit runs, register and unregister node keys; no caller authentication in open-source Flower) and the
Runtime API (a ServerApp's tasks). ``fedtune superlink`` binds that server to loopback and puts this proxy on
the address the nodes dial. It forwards exactly the Fleet routes, :data:`FLEET_ROUTES`, as ``POST`` with their
body, ``content-type`` and Flower's ``flwr-*`` headers (version, node signature), to the same path on the
loopback SuperLink, over TLS verified with the federation's CA; every other method or path is answered ``404``
without reaching the SuperLink. A path is forwarded only when it equals a table entry exactly, and no query
string is passed on, so no path trick (``..``, ``%2e``, ``//``, a query) reaches anything else.
"""

from __future__ import annotations

import socket
import ssl
import threading
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fedtune.errors import FedtuneError

FLEET_ROUTES = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received"))
"""The paths of flwr 1.42's Fleet API (``flwr/superlink/routers/fleet/router.py``), all ``POST``: what a
SuperNode calls, and all the proxy forwards."""

UPSTREAM_TIMEOUT_S = 300.0
"""Seconds the proxy waits for the SuperLink's answer to one request (a SuperNode's own timeout is shorter)."""
START_TIMEOUT_S = 30.0
"""Seconds the proxy may take to start serving."""


def _forwarded(headers, names=("content-type",)) -> dict[str, str]:
    """The headers a Fleet exchange needs: ``names`` and Flower's own (``flwr-*``, ``x-flwr-*``)."""
    return {k: v for k, v in headers.items() if k.lower() in names or k.lower().startswith(("flwr-", "x-flwr-"))}


def fleet_app(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """The proxy's ASGI app: ``POST`` to a path in :data:`FLEET_ROUTES` goes to ``upstream`` + that path; any
    other request is ``404``. ``verify``: how the upstream's certificate is checked (False only for a plain-HTTP
    upstream). A SuperLink that cannot be reached is a ``502``."""
    # No idle connection is kept to the SuperLink: it would hold the SuperLink's shutdown for the 30 s TLS
    # close timeout; one loopback handshake per request costs far less than a Fleet round trip.
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=10),
                               limits=httpx.Limits(max_keepalive_connections=0))

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or path not in FLEET_ROUTES:
            print(f"fedtune superlink: refused {request.method} {path!r} from "
                  f"{request.client.host if request.client else '?'} (only the Fleet API is served here)", flush=True)
            return Response(status_code=404)
        headers = {**_forwarded(request.headers), "accept-encoding": "identity"}
        try:
            answer = await client.post(path, content=await request.body(), headers=headers)
        except httpx.HTTPError as e:
            print(f"fedtune superlink: the SuperLink did not answer {path}: {e!r}", flush=True)
            return Response(status_code=502)
        return Response(answer.content, status_code=answer.status_code, headers=_forwarded(answer.headers))

    @asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    every_method = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=every_method)], lifespan=lifespan)


class FleetProxy:
    """:func:`fleet_app` served on ``(host, port)`` by uvicorn in a thread of this process.

    The socket is bound in :meth:`__init__` (a taken address is a :class:`FedtuneError` before anything
    starts); :meth:`start` serves, :meth:`stop` ends. ``certfile``/``keyfile``: the TLS identity it presents
    (the SuperLink's own); None: plain HTTP."""

    def __init__(self, host: str, port: int, upstream: str, verify: ssl.SSLContext | bool,
                 certfile: str | None, keyfile: str | None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family, reuse_port=False)
        except OSError as e:
            raise FedtuneError(f"cannot listen on the Fleet address {host}:{port} ({e.strerror}); give a free "
                               "--fleet-address HOST:PORT") from None
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        config = uvicorn.Config(fleet_app(upstream, verify), log_config=None, access_log=False, lifespan="on",
                                ssl_certfile=certfile, ssl_keyfile=keyfile)
        try:
            config.load()
        except (OSError, ssl.SSLError) as e:
            self.socket.close()
            raise FedtuneError(f"cannot use the TLS certificate {certfile} and key {keyfile} for the Fleet "
                               f"address ({e}); give the SuperLink's --ssl-certfile and --ssl-keyfile") from None
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="fedtune-fleet-proxy", daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as e:  # noqa: BLE001 -- reported by start() / alive()
            self.error = e

    def start(self) -> None:
        """Serve; returns once the proxy accepts connections."""
        self.thread.start()
        for _ in range(int(START_TIMEOUT_S / 0.05)):
            if self.server.started:
                return
            if not self.thread.is_alive():
                break
            self.thread.join(0.05)
        raise FedtuneError(f"the Fleet proxy on {self.address} did not start: {self.error!r}")

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(10)
        self.socket.close()
