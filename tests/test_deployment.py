"""A real Flower deployment on localhost: TLS SuperLink, three SuperNodes, ``flwr run``.

``scripts/make_certs.sh`` makes a CA and a server certificate; ``fedtune superlink`` (TLS)
and three ``fedtune supernode`` processes (the CA as root certificate) start on free ports,
with no virtual environment activated (``PATH`` holds only the system's folders: the
commands are called by their path in this interpreter's ``bin/``); ``flwr run`` submits a
2-round FedIT run of the tiny model to that SuperLink (connection in a private
``FLWR_HOME/config.toml``).

- Node-local data: each SuperNode runs in its own folder and reads its own ``train.tsv``
  (``client-id=i data-path=train.tsv``); the server's config names no client file. A
  ``sitecustomize`` on every process's ``PYTHONPATH`` records each file a process opens
  under the nodes' folders: the ServerApp opens none, and each node only its own. The run
  equals the in-process run on the same three files (adapters and bytes), and each node
  builds its experiment once for all its messages. When the SuperLink is killed, the
  SuperNodes exit. A fourth SuperNode started with ``--insecure`` is refused by the TLS SuperLink.
- A split dataset (``partition-id``): SuperNode 2 is SIGKILLed once round 1 is logged; the
  run completes and round 2 lists ``missing: [2]``.

Every wait has a hard timeout and every process started here (and its children:
SuperExec, ServerApp, ClientApps) is killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (apt-get install openssl)"),
]

AUDIT = """\
import json, os, sys
_root, _log = os.environ.get("AUDIT_ROOT"), os.environ.get("AUDIT_LOG")
if _root and _log:
    def _hook(event, args, _root=os.path.realpath(_root), _log=os.path.realpath(_log)):
        if event == "open" and isinstance(args[0], str):
            path = os.path.realpath(args[0])
            if path.startswith(_root + os.sep) and not path.startswith(_log + os.sep):
                with open(os.path.join(_log, str(os.getpid())), "a") as f:
                    f.write(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path": path}) + "\\n")
    sys.addaudithook(_hook)
"""
"""A ``sitecustomize`` (test only): records every open of a file under ``AUDIT_ROOT`` (outside ``AUDIT_LOG``)
in ``AUDIT_LOG/<pid>``, with the process's argv and working directory."""

RUN_TIMEOUT_S = 300  # a bound on a hung run, generous for a loaded 2-core machine (not a speed target)

FOREIGN_CLIENT = """\
from pathlib import Path
Path({marker!r}).write_text("the foreign ClientApp's code ran on a node")
from flwr.clientapp import ClientApp
app = ClientApp()
"""
FOREIGN_SERVER = """\
import json
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()

@app.main()
def main(grid, context):
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict({{"q": ConfigRecord({{"give": "rows"}})}}), dst_node_id=n, message_type="query")
                for n in nodes]
    replies = grid.send_and_receive(messages, timeout=120)
    answers = [r.error.reason if r.has_error() else "answered" for r in replies]
    open({result!r}, "w").write(json.dumps(answers))
"""
"""An app that is not fedtune's: its ClientApp writes a marker file when imported; its ServerApp asks every node
for a message and records what came back."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(what: str, check, timeout_s: float, procs=(), logs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        for p in procs:
            if p.poll() is not None and not check():
                raise AssertionError(f"{what}: process {p.args[0]} exited ({p.returncode})\n" + _tails(logs))
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s\n" + _tails(logs))
        time.sleep(0.3)


def _tails(logs, n: int = 3000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in logs if p.exists())


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """Kill each process, its process group and every descendant (SuperExec starts new sessions)."""
    victims: dict[int, psutil.Process] = {}
    for p in procs:
        try:
            root = psutil.Process(p.pid)
            for q in [root, *root.children(recursive=True)]:
                victims[q.pid] = q
        except psutil.NoSuchProcess:
            pass
    for q in victims.values():
        try:
            q.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=8)
    for q in alive:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def tiny_config(model_dir: Path, data_dir: Path, partition: dict | None = None, labels: list[str] | None = None,
                **federation) -> dict:
    """The tests' run: 2 FedIT rounds of the tiny model over 3 clients."""
    return {
        "seed": 3, "threads": 1,
        "data": {"name": str(data_dir), "text_column": "sentence", "label_column": "label", "labels": labels},
        "partition": partition or {"method": "iid", "num_clients": 3},
        "model": {"name": str(model_dir), "max_length": 32},
        "lora": {"r": 4, "alpha": 8},
        "train": {"local_steps": 3, "batch_size": 8, "lr": 2e-2},
        "federation": {"rounds": 2, **federation},
        "algorithm": {"name": "fedit"},
        "eval": {"every": 1, "batch_size": 32},
    }


class Deployment:
    """Certificates, a TLS SuperLink, SuperNodes and ``flwr run``, all in ``tmp_path``; :meth:`close` kills them."""

    def __init__(self, tmp_path: Path, config: dict):
        self.tmp = tmp_path
        self.allowed = f"model-root={config['model']['name']} data-root={config['data']['name']}"
        """Node config of the folders a node may read because the run names them: the tiny model and dataset."""
        self.certs, self.logs, home = tmp_path / "certs", tmp_path / "logs", tmp_path / "flwr_home"
        self.logs.mkdir()
        home.mkdir()
        subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(self.certs)], check=True, timeout=60,
                       capture_output=True)
        for f in ("ca.crt", "server.pem", "server.key"):
            assert (self.certs / f).is_file()
        self.port, self.fleet_port = _free_port(), _free_port()  # the SuperLink on loopback; the nodes' door
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local-tls"\n\n[superlink.local-tls]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')
        self.cfg_path = tmp_path / "deployed.yaml"
        self.cfg_path.write_text(json.dumps({**config, "name": "deployed", "output_dir": str(tmp_path / "runs")}))
        self.run_dir = tmp_path / "runs" / "deployed"
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(AUDIT)
        self.audit = tmp_path / "audit"
        self.audit.mkdir()
        self.nodes_root = tmp_path / "nodes"
        self.nodes_root.mkdir()
        # no activated environment: only the system's folders on PATH (openssl, bash); fedtune by its path
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
                    "PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(site),
                    "AUDIT_ROOT": str(tmp_path), "AUDIT_LOG": str(self.audit)}
        self.env.pop("VIRTUAL_ENV", None)
        self.procs: list[subprocess.Popen] = []
        self.node_logs: list[Path] = []
        self.nodes: list[subprocess.Popen] = []
        self.node_ports: list[int] = []
        self.link_log = self.logs / "superlink.log"
        self.flwr_log = self.logs / "flwr_run.log"

    def start(self, name: str, args: list[str], cwd: Path | None = None,
              env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:
            p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env or self.env, cwd=cwd or self.tmp,
                                 start_new_session=True)
        self.procs.append(p)
        return p, log

    def activated(self) -> int:
        return self.link_log.read_text(errors="replace").count("Activated node_id")

    def start_link_and_nodes(self, n: int = 3, node_config=None, plain: bool = False) -> None:
        """The SuperLink, then ``n`` SuperNodes; ``node_config(i)`` gives node i's (default: ``partition-id``),
        and each runs in its own folder ``nodes/node_<i>``. ``plain``: Flower's own ``flower-supernode``
        (with this environment's ``bin/`` on PATH, which it needs), whose ClientApp rebuilds the experiment for
        every message, instead of ``fedtune supernode``."""
        c = self.certs
        self.link = None
        link, _ = self.start("superlink", [
            str(BIN / "fedtune"), "superlink", "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
            "--ssl-keyfile", str(c / "server.key"), "--port", str(self.port),
            "--fleet-address", f"127.0.0.1:{self.fleet_port}", "--database", str(self.tmp / "state.db")])
        _wait_for("SuperLink listening", lambda: "Uvicorn running" in self.link_log.read_text(errors="replace"),
                  45, [link], [self.link_log])
        self.link = link
        for i in range(n):
            folder = self.nodes_root / f"node_{i}"
            folder.mkdir(exist_ok=True)
            key = self.node_key(i)
            config = node_config(i) if node_config else f"partition-id={i} num-partitions={n} {self.allowed}"
            command = [str(BIN / "flower-supernode")] if plain else [str(BIN / "fedtune"), "supernode"]
            self.node_ports.append(_free_port())
            p, log = self.start(f"supernode{i}", [
                *command, "--superlink", f"127.0.0.1:{self.fleet_port}", "--auth-supernode-private-key", str(key),
                "--root-certificates", str(c / "ca.crt"), "--port", str(self.node_ports[-1]), "--node-config", config,
                "--max-wait-time", "20"], cwd=folder,
                env={**self.env, "PATH": f"{BIN}{os.pathsep}{self.env['PATH']}"} if plain else None)
            self.nodes.append(p)
            self.node_logs.append(log)

    def node_key(self, i: int) -> Path:
        """Node i's key pair (``ssh-keygen``, as the recipe), its public half registered on the link's loopback
        Control API with ``flwr supernode register``; the private key's path."""
        key = self.tmp / "keys" / f"client_{i}"
        key.parent.mkdir(exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True,
                       timeout=30)
        out = subprocess.run([str(BIN / "flwr"), "supernode", "register", f"{key}.pub"], capture_output=True,
                             text=True, env=self.env, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return key

    def wait_registered(self, n: int = 3) -> None:
        _wait_for(f"{n} SuperNodes registered", lambda: self.activated() >= n, 60, self.procs[:n + 1],
                  [self.link_log, *self.node_logs])

    def flwr_run(self, log: Path | None = None) -> subprocess.Popen:
        """``fedtune submit`` of the run (``flwr run``, ``flwr log --stream``, then the run's final status)."""
        with (log or self.flwr_log).open("wb") as fh:
            run = subprocess.Popen([str(BIN / "fedtune"), "submit", str(self.cfg_path), "--overwrite"],
                                   stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp,
                                   start_new_session=True)
        self.procs.append(run)
        return run

    def wait_finished(self, run: subprocess.Popen) -> list[dict]:
        summary = self.run_dir / "summary.json"
        _wait_for("the deployed run finished", summary.is_file, RUN_TIMEOUT_S, [run],
                  [self.flwr_log, self.link_log, *self.node_logs])
        assert json.loads(summary.read_text())["runtime"] == "flower"
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line]

    def close(self) -> None:
        _kill_all(self.procs)


def test_tls_deployment_with_node_local_data_matches_inprocess(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.config import RunConfig
    from fedtune.run import execute
    from fedtune.runlog import load_run
    from safetensors.torch import load_file
    from test_node_local import client_files

    dep = Deployment(tmp_path, tiny_config(tiny_model_dir, tiny_tsv_dataset, round_timeout_s=120, labels=["0", "1"],
                                           partition={"method": "files", "num_clients": 3}))
    files = client_files(dep.nodes_root, tiny_tsv_dataset)
    try:
        dep.start_link_and_nodes(3, node_config=lambda i: f"client-id={i} data-path=train.tsv {dep.allowed}")
        # the same client as node 0: if TLS let it in, FlowerPool would refuse two nodes claiming client 0
        insecure, insecure_log = dep.start("insecure", [
            str(BIN / "fedtune"), "supernode", "--insecure", "--superlink", f"127.0.0.1:{dep.fleet_port}",
            "--port", str(_free_port()), "--node-config", f"client-id=0 data-path=train.tsv {dep.allowed}",
            "--max-retries", "3", "--max-wait-time", "20"], cwd=dep.nodes_root / "node_0")
        dep.wait_registered(3)
        watch = CommandLines(dep.nodes).start()  # what another local account sees of the nodes' processes
        run = dep.flwr_run()
        rows = dep.wait_finished(run)
        watch.stop()
        assert watch.task_processes, "no task process of a node was seen during the run"
        assert not watch.with_token, watch.with_token  # a task token never appears on a command line
        assert [r["round"] for r in rows] == [0, 1, 2]
        for r in rows[1:]:
            assert r["clients"] == [0, 1, 2], r
            assert r["missing"] == [] and r["rejected"] == [], r
            assert r["bytes_up"] > 0 and r["wire_bytes_up"] >= r["bytes_up"]

        # the same three files in-process: the same adapters, the same bytes
        cfg = json.loads(dep.cfg_path.read_text())
        cfg["name"], cfg["partition"]["files"] = "inprocess", [str(f) for f in files]
        ref = RunConfig.model_validate(cfg)
        execute(ref)
        deployed, local = load_file(dep.run_dir / "adapter" / "adapter_model.safetensors"), \
            load_file(ref.run_dir / "adapter" / "adapter_model.safetensors")
        assert deployed.keys() == local.keys()
        assert all(bool((deployed[k] == local[k]).all()) for k in deployed)
        for ra, rb in zip(load_run(ref.run_dir).rows, rows, strict=True):
            for key in ("bytes_up", "bytes_down", "train_loss", "eval/accuracy"):
                assert ra.get(key) == rb.get(key), key

        # who opened which client file: each node its own, the ServerApp none
        opens = [json.loads(line) for f in dep.audit.iterdir() for line in f.read_text().splitlines()]
        client_files_opened = [o for o in opens if o["path"] in {str(f.resolve()) for f in files}]
        assert client_files_opened, "the audit hook saw no node read its file"
        server = [o for o in opens if "flwr-serverapp" in " ".join(o["argv"])]
        assert any(o["path"] == str(dep.cfg_path.resolve()) for o in server), "the hook did not run in the ServerApp"
        for o in client_files_opened:
            assert "supernode" in " ".join(o["argv"]), o  # a node's worker, not the ServerApp
            assert Path(o["path"]).parent == Path(o["cwd"]).resolve(), o  # its own folder's file
        for log in dep.node_logs:  # one build per node for hello + 2 train messages; every task process forked
            text = log.read_text(errors="replace")
            assert text.count("built the experiment") == 1, text[-3000:]
            assert text.count("(forked) ended with status 0") >= 3, text[-3000:]

        # another local account: without the node's secret it cannot acquire a task; no task token on any command line
        _check_no_one_else_takes_a_task(dep)

        assert run.wait(timeout=120) == 0, _tails([dep.flwr_log])  # fedtune submit: the run completed

        # an app that is not fedtune's is refused by every node, and none of its code runs there
        _submit_foreign_app(dep, n_nodes=3)

        # two owners' files stop passing the run's checks: the run fails with one line naming both, exit status 1
        for f in files[1:]:
            f.write_text(f.read_text().replace("\t1\n", "\tpositve\n", 1))
        failed_log = dep.logs / "failed_run.log"
        failed = dep.flwr_run(failed_log)
        assert failed.wait(timeout=RUN_TIMEOUT_S) == 1, _tails([failed_log])
        ended = [line for line in failed_log.read_text().splitlines() if line.startswith("fedtune submit: run")][-1]
        assert "ended finished:failed" in ended and "2 nodes could not start their client" in ended, ended
        assert "client 1 failed while starting its client: its data file does not pass the run's checks" in ended
        assert "client 2 failed" in ended and "positve" not in ended and "<class" not in ended, ended

        # The insecure SuperNode gave up (Flower exit code 305: no connection) and never registered.
        _wait_for("the --insecure SuperNode gave up", lambda: insecure.poll() is not None, 60, [], [insecure_log])
        assert insecure.returncode != 0
        assert "SuperNode ID" not in insecure_log.read_text(errors="replace")
        assert dep.activated() == 3

        # the SuperLink dies: every SuperNode (and its fedtune supernode process) exits on its own
        _kill_all([dep.link])
        _wait_for("the SuperNodes exited after losing their SuperLink",
                  lambda: all(p.poll() is not None for p in dep.nodes), 120, [], dep.node_logs)
    finally:
        dep.close()


class CommandLines:
    """Samples, every 50 ms, the command lines of every process of the given nodes (``ps`` shows them to any
    local account): ``task_processes`` are the forks that ran tasks, ``with_token`` any command line holding a
    task token (the link host's own ServerApp process has one: the link host is single-tenant, docs/security.md)."""

    def __init__(self, nodes: list[subprocess.Popen]):
        import threading

        self.nodes, self.task_processes, self.with_token = nodes, set(), []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> "CommandLines":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            for node in self.nodes:
                try:
                    root = psutil.Process(node.pid)
                    for p in root.children(recursive=True):
                        cmd = p.cmdline()
                        if "--token" in cmd:
                            self.with_token.append(cmd)
                        if p.ppid() == node.pid and cmd == root.cmdline():
                            self.task_processes.add(p.pid)  # a fork of the worker: a task
                except psutil.Error:
                    continue


def _check_no_one_else_takes_a_task(dep: "Deployment") -> None:
    """As another local account would: ask each node's task API for a task without the node's secret (refused,
    401); the secret file is the worker's alone."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    body = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]).SerializeToString()
    for port in dep.node_ports:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/runtime/acquire-task", content=body,
                       headers={"content-type": "application/protobuf"}, timeout=10)
        assert r.status_code == 401, (port, r.status_code, r.text[:300])
    for log in dep.node_logs:
        secret = [line for line in log.read_text(errors="replace").splitlines() if "superexec-auth-secret-file" in line]
        path = Path(secret[0].split("--superexec-auth-secret-file", 1)[1].split()[0])
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700


def _submit_foreign_app(dep: "Deployment", n_nodes: int) -> None:
    app = dep.tmp / "foreign_app"
    app.mkdir()
    marker, result = dep.tmp / "foreign_code_ran", dep.tmp / "foreign_replies.json"
    (app / "evil_client.py").write_text(FOREIGN_CLIENT.format(marker=str(marker)))
    (app / "evil_server.py").write_text(FOREIGN_SERVER.format(result=str(result)))
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "fedtune"\n\n'
        '[tool.flwr.app.components]\nserverapp = "evil_server:app"\nclientapp = "evil_client:app"\n')
    log = dep.logs / "foreign_run.log"
    with log.open("wb") as fh:
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "--stream"], stdout=fh, stderr=subprocess.STDOUT,
                               env=dep.env, cwd=app, start_new_session=True)
    dep.procs.append(run)
    _wait_for("the foreign app's ServerApp recorded the nodes' replies", result.is_file, RUN_TIMEOUT_S, [],
              [log, dep.link_log, *dep.node_logs])
    answers = json.loads(result.read_text())
    assert len(answers) == n_nodes and all("not fedtune's" in a for a in answers), answers
    assert not marker.exists(), "the foreign ClientApp's code ran on a node"
    for node_log in dep.node_logs[:n_nodes]:
        text = node_log.read_text(errors="replace")
        assert text.count("refused a submitted app before running any of it") == 1, text[-2000:]


def test_supernode_killed_during_round_2_is_left_out(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """SIGKILL SuperNode 2 (and its ClientApp processes) once round 1 is logged: round 2 aggregates 0 and 1."""
    dep = Deployment(tmp_path, tiny_config(tiny_model_dir, tiny_tsv_dataset, round_timeout_s=40))
    try:
        dep.start_link_and_nodes(3)
        dep.wait_registered(3)
        run = dep.flwr_run()
        _wait_for("round 1 logged", lambda: "round 1/2  train_loss" in dep.flwr_log.read_text(errors="replace"),
                  RUN_TIMEOUT_S, [run], [dep.flwr_log, dep.link_log])
        _kill_all([dep.nodes[2]])
        rows = dep.wait_finished(run)
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert rows[1]["missing"] == [] and rows[1]["clients"] == [0, 1, 2]
        assert rows[2]["missing"] == [2], rows[2]
        assert "eval/accuracy" in rows[2]
    finally:
        dep.close()
