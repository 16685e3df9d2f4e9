"""A real Flower deployment on localhost: TLS SuperLink, three SuperNodes, ``flwr run``.

``scripts/make_certs.sh`` makes a CA and a server certificate; one ``flower-superlink``
(TLS) and three ``flower-supernode`` processes (``partition-id`` 0..2, the CA as root
certificate) start on free ports; ``flwr run`` submits a 2-round FedIT run of the tiny
model to that SuperLink (connection in a private ``FLWR_HOME/config.toml``). A fourth
SuperNode started with ``--insecure`` claims partition 0: the TLS SuperLink must refuse it
(had it joined, the ServerApp would stop on two nodes claiming partition-id 0). A second test
SIGKILLs SuperNode 2 once round 1 is logged: the run completes and round 2 lists ``missing: [2]``.

Every wait has a hard timeout and every process started here (and its children:
SuperExec, ServerApp, ClientApps) is killed in ``finally``. These are the slowest tests: most of their time
is Flower starting one ClientApp process (torch import + model build) per message.
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
pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (apt-get install openssl)"),
]


@pytest.fixture(autouse=True, scope="module")
def _flower_tools_on_path():
    """The flwr tools (and the processes they start) come from this interpreter's environment, activated or not."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        yield

RUN_TIMEOUT_S = 300  # a bound on a hung run, generous for a loaded 2-core machine (not a speed target)


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


class Deployment:
    """Certificates, a TLS SuperLink, SuperNodes and ``flwr run``, all in ``tmp_path``; :meth:`close` kills them."""

    def __init__(self, tmp_path: Path, model_dir: Path, data_dir: Path, **federation):
        self.tmp = tmp_path
        self.certs, self.logs, home = tmp_path / "certs", tmp_path / "logs", tmp_path / "flwr_home"
        self.logs.mkdir()
        home.mkdir()
        subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(self.certs)], check=True, timeout=60,
                       capture_output=True)
        for f in ("ca.crt", "server.pem", "server.key"):
            assert (self.certs / f).is_file()
        self.port = _free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local-tls"\n\n[superlink.local-tls]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')
        self.cfg_path = tmp_path / "tiny.yaml"
        self.cfg_path.write_text(json.dumps({  # JSON is YAML
            "name": "deployed", "output_dir": str(tmp_path / "runs"), "seed": 3, "threads": 1,
            "data": {"name": str(data_dir), "text_column": "sentence", "label_column": "label"},
            "partition": {"method": "iid", "num_clients": 3},
            "model": {"name": str(model_dir), "max_length": 32},
            "lora": {"r": 4, "alpha": 8},
            "train": {"local_steps": 3, "batch_size": 8, "lr": 2e-2},
            "federation": {"rounds": 2, **federation},
            "algorithm": {"name": "fedit"},
            "eval": {"every": 1, "batch_size": 32},
        }))
        self.run_dir = tmp_path / "runs" / "deployed"
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen] = []
        self.node_logs: list[Path] = []
        self.nodes: list[subprocess.Popen] = []
        self.link_log = self.logs / "superlink.log"
        self.flwr_log = self.logs / "flwr_run.log"

    def start(self, name: str, args: list[str], cwd: Path | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:
            p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=cwd or self.tmp,
                                 start_new_session=True)
        self.procs.append(p)
        return p, log

    def activated(self) -> int:
        return self.link_log.read_text(errors="replace").count("Activated node_id")

    def start_link_and_nodes(self, n: int = 3) -> None:
        c = self.certs
        link, _ = self.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
            "--ssl-keyfile", str(c / "server.key"), "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.tmp / "state.db"), "--disable-runtime-dependency-installation"])
        _wait_for("SuperLink listening", lambda: "Uvicorn running" in self.link_log.read_text(errors="replace"),
                  45, [link], [self.link_log])
        for i in range(n):
            p, log = self.start(f"supernode{i}", [
                "flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--root-certificates", str(c / "ca.crt"),
                "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions={n}",
                "--max-wait-time", "60"])
            self.nodes.append(p)
            self.node_logs.append(log)

    def wait_registered(self, n: int = 3) -> None:
        _wait_for(f"{n} SuperNodes registered", lambda: self.activated() >= n, 60, self.procs[:n + 1],
                  [self.link_log, *self.node_logs])

    def flwr_run(self) -> subprocess.Popen:
        with self.flwr_log.open("wb") as fh:
            run = subprocess.Popen(
                ["flwr", "run", str(REPO), "--stream", "--run-config", f"config='{self.cfg_path}' overwrite=true"],
                stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True)
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


def test_tls_superlink_three_supernodes_flwr_run(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    dep = Deployment(tmp_path, tiny_model_dir, tiny_tsv_dataset, round_timeout_s=120)
    try:
        dep.start_link_and_nodes(3)
        # Same partition as node 0: if TLS let it in, FlowerPool would refuse two nodes with partition-id 0.
        insecure, insecure_log = dep.start("insecure", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{dep.port}", "--port", str(_free_port()),
            "--node-config", "partition-id=0 num-partitions=3", "--max-retries", "3", "--max-wait-time", "20"])
        dep.wait_registered(3)
        run = dep.flwr_run()
        rows = dep.wait_finished(run)
        assert [r["round"] for r in rows] == [0, 1, 2]
        for r in rows[1:]:
            assert r["clients"] == [0, 1, 2], r
            assert r["missing"] == [] and r["rejected"] == [], r
            assert r["bytes_up"] > 0 and r["wire_bytes_up"] >= r["bytes_up"]
        assert (dep.run_dir / "adapter" / "adapter_config.json").is_file()

        # The insecure SuperNode gave up (Flower exit code 305: no connection) and never registered.
        _wait_for("the --insecure SuperNode gave up", lambda: insecure.poll() is not None, 30, [], [insecure_log])
        assert insecure.returncode != 0
        assert "SuperNode ID" not in insecure_log.read_text(errors="replace")
        assert dep.activated() == 3
    finally:
        dep.close()


def test_supernode_killed_during_round_2_is_left_out(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """SIGKILL SuperNode 2 (and its ClientApp processes) once round 1 is logged: round 2 aggregates 0 and 1."""
    dep = Deployment(tmp_path, tiny_model_dir, tiny_tsv_dataset, round_timeout_s=60)
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
