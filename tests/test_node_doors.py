"""A deployed node's doors (docs/security.md), each tried as an attacker would, without starting Flower.

- The node alone decides what it reads: a server-side config cannot make a deployed node open
  ``partition.files``, a ``data.name`` path or a ``model.name`` path its operator did not allow.
- What a node tells the server of an error holds no row content.
- A node reads its file afresh for a new run when the file changed, and refuses to join on a bad file.
- Only fedtune's own ClientApp runs: an app bundle naming another is refused unread.
``tests/test_deployment.py`` tries the same doors on a real SuperLink and SuperNodes.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedtune.errors import FedtuneError
from fedtune.runtime import flower_node
from fedtune.runtime.flower_client import WorkerError, worker_call
from fedtune.runtime.flower_node import node_data
from fedtune.runtime.node_tasks import FEDTUNE_CLIENTAPP, ForeignApp, check_fab
from fedtune.runtime.supernode import NodeWorker, prepare_node_args
from test_flower import tiny_cfg
from test_node_local import client_files, files_cfg


def _hello(cfg) -> RecordDict:
    return RecordDict({"fedtune": ConfigRecord({"run": json.dumps(cfg.to_dict(), sort_keys=True), "action": "hello"})})


# --------------------------------------------------------------------------- what a node reads


def test_a_deployed_node_never_opens_a_path_the_server_names(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    cfg = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "f", files=files)  # the server lists every file
    with pytest.raises(FedtuneError, match="has no data-path; a node reads only the file its operator names"):
        node_data(cfg, {"client-id": 1}, deployed=True)
    assert node_data(cfg, {"client-id": 1}, deployed=False).path is None  # the simulation reads partition.files
    assert node_data(cfg, {"client-id": 1, "data-path": "/srv/mine.tsv"}, deployed=True).path == "/srv/mine.tsv"

    split = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "s")  # data.name is a path
    with pytest.raises(FedtuneError, match="not a registered dataset name: a node never opens a path"):
        node_data(split, {"partition-id": 0}, deployed=True)
    assert node_data(split, {"partition-id": 0, "data-root": str(tiny_tsv_dataset.parent)}, deployed=True)
    named = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "n", data={"name": "sst2"})
    assert node_data(named, {"partition-id": 0}, deployed=True).client_id == 0  # a name, in the node's own roots

    with pytest.raises(FedtuneError, match="load the model at .* a path the server names"):
        flower_node.check_model_name(split, {"partition-id": 0})
    flower_node.check_model_name(split, {"partition-id": 0, "model-root": str(tiny_model_dir)})
    for name in ("minilm", "sentence-transformers/all-MiniLM-L6-v2"):  # packaged, or a Hub id in its own cache
        flower_node.check_model_name(tiny_cfg(tmp_path, name, tiny_tsv_dataset, "m"), {})


@pytest.fixture
def worker():
    w = NodeWorker().start(take_tasks=False)
    yield w
    w.close()


def test_a_node_error_reaching_the_server_holds_no_row_content(tmp_path, tiny_model_dir, tiny_tsv_dataset, worker,
                                                               caplog):
    secret = "HIV-positive"
    data = tmp_path / "mine.tsv"
    data.write_text(f"sentence\tlabel\nthe results came back\t{secret}\nall clear\t0\n")
    cfg = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "e")
    node = {"client-id": 0, "data-path": str(data), "model-root": str(tiny_model_dir)}
    with caplog.at_level(logging.ERROR, logger="fedtune.supernode"):
        with pytest.raises(WorkerError) as err:
            worker_call(worker.folder, ("query", _hello(cfg), node, None))
    assert secret not in str(err.value) and "the results came back" not in str(err.value)
    assert str(err.value) == ("client 0 failed while starting its client: its data file does not pass the run's "
                              "checks (its columns, labels or rows: see that node's own log)")
    assert secret in caplog.text  # the node's own log has the whole story


def test_a_node_reads_its_file_afresh_when_it_changed(tmp_path, tiny_model_dir, tiny_tsv_dataset, worker):
    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    cfg = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "w")
    node = {"client-id": 2, "data-path": str(files[2]), "model-root": str(tiny_model_dir)}

    def rows() -> int:
        report = dict(worker_call(worker.folder, ("query", _hello(cfg), node, None))[0]["metrics"])
        return report["train"] + report["test"]

    first = rows()
    kept = flower_node.kept_experiment()
    assert rows() == first and flower_node.kept_experiment() is kept  # unchanged: the same experiment
    header, *lines = files[2].read_text().splitlines()
    files[2].write_text("\n".join([header, *lines[:-6]]) + "\n")  # the owner fixes the file between two runs
    assert rows() == first - 6 and flower_node.kept_experiment() is not kept


def test_a_node_with_a_bad_file_refuses_to_join(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(FedtuneError, match="holds no rows"):
        prepare_node_args(["--node-config", f"client-id=0 data-path={empty}"], None)
    typo = tmp_path / "typo.tsv"
    typo.write_text("sentence\tlabel\ngood film\t1\nbad film\t2\n")
    prepare_node_args(["--node-config", f"client-id=0 data-path={typo}"], None)  # a table: parses
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(json.dumps(files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "c").to_dict()))
    with pytest.raises(FedtuneError, match="typo.tsv line 3: label '2' is not one of 0, 1"):  # as the run checks it
        prepare_node_args(["--node-config", f"client-id=0 data-path={typo} config={cfg_file}"], None)


def test_flags_that_would_reopen_the_node_are_refused():
    for flag in (["--isolation", "subprocess"], ["--superexec-auth-secret-file", "s"],
                 ["--allow-runtime-dependency-installation"], ["--trusted-entities", "t.yaml"]):
        with pytest.raises(FedtuneError, match="is set by fedtune supernode itself"):
            prepare_node_args(flag, None)
    with pytest.raises(FedtuneError, match="task API must stay on this machine"):
        prepare_node_args(["--host", "0.0.0.0"], None)
    args = prepare_node_args(["--host", "127.0.0.1"], "/w", "/w/secret")
    assert args[-4:] == ["--isolation", "process", "--superexec-auth-secret-file", "/w/secret"]


# --------------------------------------------------------------------------- only fedtune's ClientApp


def _fab(clientapp: str | None, extra: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        components = "" if clientapp is None else f'clientapp = "{clientapp}"\n'
        z.writestr("pyproject.toml", f'[tool.flwr.app]\npublisher = "x"\n[tool.flwr.app.components]\n{components}')
        for name, text in (extra or {}).items():
            z.writestr(name, text)
    return buf.getvalue()


def test_only_an_app_naming_fedtunes_clientapp_is_accepted():
    check_fab(_fab(FEDTUNE_CLIENTAPP, {"fedtune/runtime/flower_client.py": "raise SystemExit"}))  # never imported
    for fab, why in ((_fab("evil:app"), "its ClientApp is 'evil:app', not fedtune's"),
                     (_fab(None), "names no ClientApp"),
                     (b"not a zip", "not a Flower app bundle")):
        with pytest.raises(ForeignApp, match=why):
            check_fab(fab)


def test_the_worker_keeps_serving_after_a_bad_connection(tmp_path, tiny_model_dir, tiny_tsv_dataset, worker):
    import socket
    from multiprocessing.connection import Client

    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    cfg = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "k")
    node = {"client-id": 0, "data-path": str(files[0]), "model-root": str(tiny_model_dir)}
    path = f"{worker.folder}/worker.sock"
    with socket.socket(socket.AF_UNIX) as s:  # connects and hangs up mid-handshake
        s.connect(path)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with pytest.raises(Exception):
        Client(path, family="AF_UNIX", authkey=b"wrong key")
    report = dict(worker_call(worker.folder, ("query", _hello(cfg), node, None))[0]["metrics"])
    assert report["client_id"] == 0


def test_a_deployed_node_refuses_to_attack_on_the_servers_say(tmp_path, tiny_model_dir, tiny_tsv_dataset, worker):
    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    cfg = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "a",
                    federation={"rounds": 1, "attack": {"kind": "sign_flip", "clients": [0]}})
    node = {"client-id": 0, "data-path": str(files[0]), "model-root": str(tiny_model_dir)}
    with pytest.raises(WorkerError, match="a deployed node never misbehaves on the server's say"):
        worker_call(worker.folder, ("query", _hello(cfg), node, None))


def test_a_deployed_node_refuses_seeded_dp_noise_on_the_servers_say(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                     worker):
    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    cfg = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "a", federation={"rounds": 1},
                    privacy={"reproducible_noise": True, "dp_sgd": {"enabled": True, "noise_multiplier": 1.0}})
    node = {"client-id": 0, "data-path": str(files[0]), "model-root": str(tiny_model_dir)}
    with pytest.raises(WorkerError, match="a deployed node draws it from a key of its own"):
        worker_call(worker.folder, ("query", _hello(cfg), node, None))
