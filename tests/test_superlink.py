"""``fedtune superlink``: only the Fleet API reaches the network, only registered nodes join, the state is private.

- Arguments (no process): what ``fedtune superlink`` refuses, each in one line, and what it adds to
  ``flower-superlink`` (SuperNode authentication, no runtime dependency installation).
- The proxy's route table is exactly flwr's Fleet API; anything else is a 404 that never reaches the SuperLink.
- ``flwr run .`` ships fedtune's code and ``pyproject.toml`` only (the FAB's file list).
- A real ``fedtune superlink`` (TLS, certificates from ``scripts/make_certs.sh``) on free ports: through the
  Fleet address, a holder of ``ca.crt`` cannot submit a run, register, unregister or list node keys, take a
  ServerApp task or read the API docs (404; the same requests on the loopback address are served, so the
  paths are real), and ``flwr supernode register`` pointed at the Fleet address fails; a ``flower-supernode``
  whose key is not registered is refused, one whose key was registered (``flwr supernode register`` on the
  loopback Control API) joins; ``state.db`` and its ``-wal``/``-shm`` are ``0600``.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import psutil
import pytest

from fedtune.errors import FedtuneError
from fedtune.runtime.fleet_proxy import FLEET_ROUTES, fleet_app
from fedtune.runtime.superlink import make_private, plan_link
from test_deployment import _free_port, _kill_all, _wait_for

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (apt-get install openssl)")
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(out)], check=True, timeout=60,
                   capture_output=True)
    return out


def _tls(certs: Path, *extra: str) -> list[str]:
    return ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), *extra]


# ---------------------------------------------------------------------------------------------- arguments


def test_link_defaults_close_the_doors(certs):
    plan = plan_link(_tls(certs, "--port", "9093", "--database", "state.db"), "0.0.0.0:9092")
    assert plan.args[-2:] == ["--enable-supernode-auth", "--disable-runtime-dependency-installation"]
    assert (plan.fleet_host, plan.fleet_port, plan.upstream) == ("0.0.0.0", 9092, "https://127.0.0.1:9093")
    assert plan.ca_certfile == str(certs / "ca.crt") and plan.database == Path("state.db")
    assert plan_link(_tls(certs)).upstream == "https://127.0.0.1:8000"  # flower-superlink's own default port


def test_link_opt_outs_are_explicit(certs):
    exposed = plan_link(_tls(certs, "--host", "0.0.0.0", "--port", "9093"), "0.0.0.0:9092", expose_control_api=True)
    assert (exposed.link_address, exposed.upstream) == ("0.0.0.0:9093", "https://127.0.0.1:9093")
    open_fleet = plan_link(_tls(certs), allow_unregistered_nodes=True)
    assert "--enable-supernode-auth" not in open_fleet.args
    plain = plan_link(["--insecure"], allow_unregistered_nodes=True)
    assert plain.upstream == "http://127.0.0.1:8000" and plain.certfile is None and plain.database is None


def _plus(*args: str):
    return lambda tls: [*tls, *args]


REFUSED = {  # case: (the arguments, from the good TLS ones; plan_link's keywords; what the line says)
    "control API on the network": (_plus("--host", "0.0.0.0"), {}, "--host 0.0.0.0 would let anyone"),
    "abbreviated --host": (_plus("--ho", "10.0.0.5"), {}, "--host 10.0.0.5 would let anyone"),
    "runtime dependency installation": (_plus("--allow-runtime-dependency-installation"), {}, "never installs"),
    "plaintext with authentication": (_plus("--insecure"), {}, "SuperNode authentication needs TLS"),
    "contradiction": (_plus("--enable-supernode-auth"), {"allow_unregistered_nodes": True}, "contradict"),
    "simulation link": (_plus("--simulation"), {}, "runs a deployment SuperLink"),
    "deprecated fleet address": (_plus("--fleet-api-address", "0.0.0.0:9092"), {}, "give --fleet-address"),
    "missing key": (lambda tls: tls[:4], {}, "TLS needs --ssl-keyfile"),
    "absent certificate": (lambda tls: [*tls[:2], "--ssl-certfile", "nowhere.pem", *tls[4:]], {},
                           "--ssl-certfile nowhere.pem does not exist"),
    "bad fleet address": (_plus(), {"fleet_address": "9092"}, "--fleet-address '9092' is not HOST:PORT"),
    "ports collide": (_plus("--port", "9092"), {"fleet_address": "0.0.0.0:9092"}, "collide"),
    "unknown option": (_plus("--bogus", "1"), {}, "unrecognized arguments: --bogus 1"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_link_refusals_are_one_line(case, certs):
    args, kwargs, expected = REFUSED[case]
    with pytest.raises(FedtuneError) as e:
        plan_link(args(_tls(certs)), **kwargs)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_cli_refusal_is_one_line_with_status_2(tmp_path):
    p = subprocess.run([str(BIN / "fedtune"), "superlink", "--host", "0.0.0.0", "--insecure"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: --host 0.0.0.0 would let anyone") and p.stderr.count("\n") == 1


def test_existing_database_is_made_private(tmp_path):
    db = tmp_path / "state.db"
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.write_bytes(b"")
        path.chmod(0o644)
    make_private(db)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o600}


# --------------------------------------------------------------------------------------------- the proxy


def test_proxy_routes_are_flowers_fleet_api():
    from flwr.superlink.routers.fleet.router import router

    assert {r.path for r in router.routes} == FLEET_ROUTES
    assert all(r.methods == {"POST"} for r in router.routes)


def test_proxy_answers_404_without_reaching_the_link():
    from starlette.testclient import TestClient

    with TestClient(fleet_app("http://127.0.0.1:9", verify=False)) as client:  # nothing listens upstream
        for path in ("/v1/control/start-run", "/v1/runtime/acquire-task", "/docs", "/health", "/v1/fleet/nope"):
            assert client.post(path, content=b"").status_code == 404, path
        assert client.get("/v1/fleet/get-run").status_code == 404
        assert client.post("/v1/fleet/get-run", content=b"").status_code == 502  # forwarded: upstream absent


# --------------------------------------------------------------------------------------------------- FAB


def test_fab_holds_only_fedtunes_code():
    from flwr.cli.build import build_fab_from_disk

    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist())
    code = {p.relative_to(REPO).as_posix() for p in (REPO / "src" / "fedtune").rglob("*.py")
            if "__pycache__" not in p.parts}
    assert names == code | {"pyproject.toml", ".info/CONTENT"}
    assert {"src/fedtune/serverapp.py", "src/fedtune/runtime/flower_client.py"} <= names


# ------------------------------------------------------------------------------------- a real SuperLink


class Link:
    """``fedtune superlink`` (TLS, SuperNode authentication) on free ports in ``tmp``, and ``flwr`` with a
    connection ``link`` to its loopback Control API and ``fleet`` to its public Fleet address."""

    def __init__(self, tmp: Path, certs: Path):
        self.tmp, self.certs = tmp, certs
        self.port, self.fleet_port = _free_port(), _free_port()
        home = tmp / "flwr_home"
        home.mkdir()
        connection = 'address = "127.0.0.1:{}"\nroot-certificates = "' + str(certs / "ca.crt") + '"\n'
        (home / "config.toml").write_text('[superlink]\ndefault = "link"\n\n[superlink.link]\n'
                                          + connection.format(self.port) + "\n[superlink.fleet]\n"
                                          + connection.format(self.fleet_port))
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
                    # flwr's switches for its legacy gRPC Control and Fleet servers: fedtune superlink drops them
                    "FLWR_INTERNAL_GRPC_CONTROL_API": "1", "FLWR_INTERNAL_GRPC_FLEET_API": "1"}
        self.procs: list[subprocess.Popen] = []
        self.log = tmp / "superlink.log"
        self.db = tmp / "state.db"
        self.link = self.start(self.log, [str(BIN / "fedtune"), "superlink", *_tls(certs), "--port", str(self.port),
                                          "--fleet-address", f"127.0.0.1:{self.fleet_port}", "--database",
                                          str(self.db)])
        _wait_for("SuperLink listening", lambda: "Uvicorn running" in self.log.read_text(errors="replace"), 60,
                  [self.link], [self.log])

    def start(self, log: Path, args: list[str]) -> subprocess.Popen:
        with log.open("wb") as fh:
            p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=self.env, cwd=self.tmp,
                              timeout=120)

    def post(self, port: int, path: str) -> tuple[int, bytes]:
        """Status and body of an empty protobuf POST to ``path``, sent as written (no normalisation), over TLS."""
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        try:
            conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()

    def node(self, name: str, key: Path | None) -> tuple[subprocess.Popen, Path]:
        """Flower's own SuperNode at the Fleet address, signing with ``key`` (None: none, it asks to register)."""
        log = self.tmp / f"{name}.log"
        signing = ["--auth-supernode-private-key", str(key)] if key else []
        return self.start(log, [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.fleet_port}",
                                "--root-certificates", str(self.certs / "ca.crt"), *signing,
                                "--port", str(_free_port()), "--max-wait-time", "20"]), log


@pytest.fixture()
def link(tmp_path, certs):
    running = Link(tmp_path, certs)
    try:
        yield running
    finally:
        _kill_all(running.procs)


CLOSED = ["/v1/control/start-run", "/v1/control/register-node", "/v1/control/unregister-node",
          "/v1/control/list-nodes", "/v1/runtime/acquire-task"]


@pytest.mark.deployment
def test_fleet_address_serves_only_the_fleet_api(link):
    tree = psutil.Process(link.link.pid)
    listening = {c.laddr for q in (tree, *tree.children(recursive=True)) for c in q.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", link.port), ("127.0.0.1", link.fleet_port)}

    refused = (404, b"")  # the proxy's own answer; a route the SuperLink lacks says {"detail":"Not Found"}
    for path in CLOSED:
        assert link.post(link.port, path)[1] != b'{"detail":"Not Found"}', f"the SuperLink itself serves {path}"
        assert link.post(link.fleet_port, path) == refused, path
    for path in ("/docs", "/openapi.json", "/health", "/v1/fleet/../control/list-nodes", "//v1/control/list-nodes",
                 "/v1/fleet/%2e%2e/control/list-nodes", "/v1/fleet/get-run/../../control/start-run"):
        assert link.post(link.fleet_port, path) == refused, path
    assert link.post(link.fleet_port, "/v1/fleet/get-run")[0] == 401  # forwarded, and refused: not a signed node
    out = link.flwr("supernode", "list", "fleet")
    assert out.returncode != 0, out.stdout  # flwr's own client, pointed at the Fleet address, manages nothing

    link.link.send_signal(signal.SIGTERM)  # the proxy stops with the SuperLink
    link.link.wait(timeout=60)
    for port in (link.port, link.fleet_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.deployment
def test_only_a_registered_node_joins_and_the_state_is_private(link, tmp_path):
    if shutil.which("ssh-keygen") is None:
        pytest.skip("needs ssh-keygen (apt-get install openssh-client)")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("client_0", "rogue"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(keys / name)],
                       check=True, timeout=30)
    assert link.flwr("supernode", "register", str(keys / "rogue.pub"), "fleet").returncode != 0
    registered = link.flwr("supernode", "register", str(keys / "client_0.pub"), "link")
    assert registered.returncode == 0, registered.stdout + registered.stderr

    _, rogue_log = link.node("rogue", keys / "rogue")
    _, anonymous_log = link.node("anonymous", None)
    good, good_log = link.node("client_0", keys / "client_0")
    logs = [link.log, good_log, rogue_log, anonymous_log]
    _wait_for("the registered node activated", lambda: "Activated node_id" in link.log.read_text(errors="replace"),
              90, [good, link.link], logs)
    for name, log in (("with an unregistered key", rogue_log), ("without a key", anonymous_log)):
        _wait_for(f"the node {name} refused", lambda log=log: "Failed to initialize the connection to the SuperLink"
                  in log.read_text(errors="replace"), 60, [], logs)
    assert link.log.read_text(errors="replace").count("Activated node_id") == 1
    listed = json.loads(link.flwr("supernode", "list", "link", "--format", "json").stdout)["nodes"]
    assert [n["status"] for n in listed] == ["online"], listed  # the rogue's key was never registered

    files = [p for p in tmp_path.iterdir() if p.name.startswith("state.db")]
    assert {p.name for p in files} >= {"state.db", "state.db-wal"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o600" for p in files}
