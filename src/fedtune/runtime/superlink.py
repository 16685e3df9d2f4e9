"""``fedtune superlink``: Flower's SuperLink with only the Fleet API on the network.

flwr 1.42's ``flower-superlink`` serves the Fleet API (what SuperNodes call), the Control API (submit a run,
register or unregister a node key; no caller authentication in open-source Flower) and the Runtime API (a
ServerApp's tasks) on one address. Reaching that address means running code on the link (a submitted app's
ServerApp) and, through the nodes, choosing who joins. This command therefore:

- runs ``flower-superlink`` on **loopback** only (its ``--host``, default ``127.0.0.1``; another host is
  refused unless ``--expose-control-api``): runs are submitted and node keys registered from the link's own
  machine (``flwr`` with a connection to ``127.0.0.1:<--port>``, or through an SSH tunnel to it);
- serves SuperNodes on ``--fleet-address`` (default :data:`DEFAULT_FLEET_ADDRESS`) through a Fleet-only TLS
  reverse proxy in this process (:mod:`fedtune.runtime.fleet_proxy`), with the SuperLink's own certificate;
- turns **SuperNode authentication** on (``--enable-supernode-auth``: a node joins only with a key registered
  by ``flwr supernode register``), unless ``--allow-unregistered-nodes``;
- turns **runtime dependency installation** off (``--disable-runtime-dependency-installation``: a submitted
  app's dependencies are never ``uv sync``-ed; the ServerApp runs in this environment);
- keeps what it writes **private to its owner**: the SuperLink and every process it starts run with umask 077,
  so ``--database`` (``state.db`` and its ``-wal``/``-shm``: messages with model tensors, apps, run configs),
  its logs and the ServerApp's run folders are ``0600``/``0700``; an existing database is made ``0600``;
- puts this interpreter's ``bin/`` first on ``PATH`` (the plain ``.venv/bin/flower-superlink`` fails
  without an activated venv: ``FileNotFoundError: flower-superexec``).

Every other option is ``flower-superlink``'s, passed through.
"""

from __future__ import annotations

import argparse
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.runtime.processes import flower_tool, supervise, tools_env

DEFAULT_FLEET_ADDRESS = "127.0.0.1:9092"
"""Where SuperNodes connect unless ``--fleet-address`` says otherwise (loopback: a deployment across machines
gives the address the nodes dial, e.g. ``0.0.0.0:9092``)."""
LINK_UMASK = 0o077
"""The SuperLink's and its children's umask: what they create is readable by their owner only."""
UNSET_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
"""flwr 1.42's switches that open its legacy gRPC Control and Fleet servers on the network (0.0.0.0:9093,
0.0.0.0:9092) beside the HTTP ones; never passed to the SuperLink."""
IN_MEMORY = (":flwr-in-memory:", ":memory:")

_REFUSED = {
    "simulation": "fedtune superlink runs a deployment SuperLink; for a simulation one run flower-superlink "
                  "--simulation (docs/flower.md)",
    "fleet_api_address": "--fleet-api-address has no effect in flwr 1.42; give --fleet-address HOST:PORT, the "
                         "address SuperNodes dial",
    "control_api_address": "--control-api-address has no effect in flwr 1.42; the Control API is served on "
                           "--host/--port (loopback)",
    "fleet_api_type": "--fleet-api-type has no effect in flwr 1.42 (the Fleet API is HTTP); remove it",
}


@dataclass(frozen=True)
class LinkPlan:
    """What ``fedtune superlink`` starts: ``flower-superlink args`` and the Fleet proxy in front of it."""

    args: list[str]
    link_address: str
    """``--host:--port``, where ``flower-superlink`` listens (loopback unless ``--expose-control-api``)."""
    fleet_host: str
    fleet_port: int
    upstream: str
    """The loopback SuperLink as the proxy reaches it (``https://127.0.0.1:<port>``)."""
    ca_certfile: str | None
    certfile: str | None
    keyfile: str | None
    database: Path | None
    """The SQLite file the SuperLink keeps its state in (None: in memory or a URL)."""


_UNSET = object()
"""An option's value before the command line sets it (which options were given at all)."""


def _flower_parser() -> argparse.ArgumentParser:
    """``flower-superlink``'s own argument parser (so abbreviations and forms are read exactly as it reads
    them), with its errors as :class:`FedtuneError`."""
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    parser = _parse_args_run_superlink()

    def error(message: str):
        raise FedtuneError(f"flower-superlink option: {message} (flower-superlink --help lists its options)")

    parser.error = error
    return parser


def parse_address(text: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedtuneError(f"{option} {text!r} is not HOST:PORT; give e.g. 0.0.0.0:9092")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _url_host(host: str) -> str:
    """The address the proxy uses to reach a SuperLink bound to ``host`` (a wildcard: this machine's loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def plan_link(args: list[str], fleet_address: str = DEFAULT_FLEET_ADDRESS, expose_control_api: bool = False,
              allow_unregistered_nodes: bool = False) -> LinkPlan:
    """Check ``args`` (``flower-superlink``'s options) against the rules of :mod:`this module
    <fedtune.runtime.superlink>` and return what to start; each refusal is one line."""
    parser = _flower_parser()
    given = {k for k, v in vars(parser.parse_args(
        args, namespace=argparse.Namespace(**{a.dest: _UNSET for a in parser._actions}))).items()
        if v is not _UNSET}
    opts = parser.parse_args(args)
    for key, message in _REFUSED.items():
        if key in given:
            raise FedtuneError(message)
    if "runtime_dependency_install" in given and opts.runtime_dependency_install:
        raise FedtuneError("fedtune superlink never installs a submitted app's dependencies (that would run "
                           "code from the app's pyproject on this machine); remove "
                           "--allow-runtime-dependency-installation")
    if not expose_control_api and not is_loopback(opts.host):
        raise FedtuneError(f"--host {opts.host} would let anyone who reaches it submit runs and manage node keys; "
                           "keep the SuperLink on loopback (the default) and give SuperNodes --fleet-address, or "
                           "add --expose-control-api to open it on purpose")
    if allow_unregistered_nodes and opts.enable_supernode_auth:
        raise FedtuneError("--allow-unregistered-nodes and --enable-supernode-auth contradict each other; keep one")
    if opts.insecure and not allow_unregistered_nodes:
        raise FedtuneError("SuperNode authentication needs TLS: give --ssl-ca-certfile, --ssl-certfile and "
                           "--ssl-keyfile instead of --insecure (or, for a plaintext experiment on one machine, "
                           "add --allow-unregistered-nodes)")
    tls = (opts.ssl_ca_certfile, opts.ssl_certfile, opts.ssl_keyfile)
    if not opts.insecure:
        missing = [f"--{n}" for n, v in zip(("ssl-ca-certfile", "ssl-certfile", "ssl-keyfile"), tls) if not v]
        if missing:
            raise FedtuneError(f"TLS needs {', '.join(missing)} (scripts/make_certs.sh makes them), or --insecure "
                               "for a plaintext experiment")
        for name, path in zip(("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"), tls):
            if not Path(path).expanduser().is_file():
                raise FedtuneError(f"{name} {path} does not exist; make the certificates with scripts/make_certs.sh")
    fleet_host, fleet_port = parse_address(fleet_address, "--fleet-address")
    if fleet_port == opts.port and (fleet_host == opts.host or _is_wildcard(fleet_host) or _is_wildcard(opts.host)):
        raise FedtuneError(f"--fleet-address {fleet_address} and the SuperLink's --port {opts.port} collide; give "
                           "the Fleet address a port of its own")
    out = list(args)
    if not allow_unregistered_nodes and not opts.enable_supernode_auth:
        out.append("--enable-supernode-auth")
    if "runtime_dependency_install" not in given:
        out.append("--disable-runtime-dependency-installation")
    database = None
    if opts.database not in IN_MEMORY and "://" not in opts.database:
        database = Path(opts.database).expanduser()
    scheme = "http" if opts.insecure else "https"
    return LinkPlan(out, f"{opts.host}:{opts.port}", fleet_host, fleet_port,
                    f"{scheme}://{_url_host(opts.host)}:{opts.port}",
                    *(None, None, None) if opts.insecure else (str(Path(p).expanduser()) for p in tls), database)


def make_private(database: Path) -> None:
    """Make an existing SQLite database and its ``-wal``/``-shm`` companions readable by their owner only
    (SQLite gives companions it creates the database file's mode)."""
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm"), Path(f"{database}-journal")):
        if path.is_file():
            path.chmod(0o600)


def run_superlink(args: list[str], fleet_address: str = DEFAULT_FLEET_ADDRESS, expose_control_api: bool = False,
                  allow_unregistered_nodes: bool = False) -> int:
    """Run the Fleet proxy and ``flower-superlink`` as :func:`plan_link` says; the SuperLink's exit status
    (1 if the proxy stopped first)."""
    from fedtune.runtime.fleet_proxy import FleetProxy  # uvicorn, starlette, httpx: only when serving

    plan = plan_link(args, fleet_address, expose_control_api, allow_unregistered_nodes)
    command = [flower_tool("flower-superlink"), *plan.args]
    if plan.database is not None:
        make_private(plan.database)
    verify = ssl.create_default_context(cafile=plan.ca_certfile) if plan.ca_certfile else False
    proxy = FleetProxy(plan.fleet_host, plan.fleet_port, plan.upstream, verify, plan.certfile, plan.keyfile)
    proxy.start()
    scheme = "plain HTTP" if plan.certfile is None else "TLS"
    print(f"fedtune superlink: SuperNodes connect to {proxy.address} ({scheme}; the Fleet API only); runs and "
          f"node keys go to {plan.upstream.split('://', 1)[1]} on this machine", flush=True)
    if expose_control_api:
        print(f"fedtune superlink: --expose-control-api: anyone who reaches {plan.link_address} can submit runs "
              "(code that runs here) and register or remove node keys", flush=True)
    if allow_unregistered_nodes:
        print("fedtune superlink: --allow-unregistered-nodes: any SuperNode that reaches the Fleet address can "
              "join and receive the run's tasks", flush=True)

    def proxy_stopped() -> str | None:
        if proxy.alive():
            return None
        return f"fedtune superlink: the Fleet proxy on {proxy.address} stopped ({proxy.error!r}); stopping the SuperLink"

    env = {k: v for k, v in tools_env().items() if k not in UNSET_ENV}
    return supervise(command, on_exit=proxy.stop, env=env, umask=LINK_UMASK, stop_if=proxy_stopped)
