"""Node-local data (``partition.method: files``): each client reads its own file, the server none of them.

In-process, client i reads ``partition.files[i]``; on Flower each node reads the file of its own
``data-path`` node config and reports its sizes and label counts, and the server's config names no client
file at all. Both give the same adapters and bytes. ``fedtune supernode``'s worker (the long-lived process a
deployed node's ClientApp forwards to) is exercised through its socket here; ``tests/test_deployment.py``
runs the real SuperLink and SuperNodes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.experiment import build_experiment
from fedtune.run import execute, execute_with
from fedtune.runlog import load_run
from fedtune.runtime.flower_client import WorkerError, worker_call
from fedtune.runtime.supernode import LINK_WAIT_S, NodeWorker, parse_node_config, prepare_node_args

from test_flower import LocalGrid, adapter, local_grid_driver, max_diff, tiny_cfg

SIZES = (24, 30, 36)


def client_files(root: Path, data_dir: Path, sizes=SIZES) -> list[Path]:
    """The tiny training rows cut into one file per client, each in its own folder (``node_<i>/train.tsv``)."""
    header, *rows = (data_dir / "train.tsv").read_text().splitlines()
    files, start = [], 0
    for i, n in enumerate(sizes):
        folder = root / f"node_{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.tsv").write_text("\n".join([header, *rows[start:start + n]]) + "\n")
        files.append(folder / "train.tsv")
        start += n
    return files


def files_cfg(tmp_path, model_dir, data_dir, name, files=None, **over) -> RunConfig:
    part = {"method": "files", "num_clients": 3, "client_test_fraction": 0.25}
    if files is not None:
        part["files"] = [str(f) for f in files]
    return tiny_cfg(tmp_path, model_dir, data_dir, name, partition=part,
                    data__labels=["0", "1"], eval={"every": 1, "batch_size": 32, "per_client": True}, **over)


def test_inprocess_clients_read_their_own_files(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    exp = build_experiment(files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "a", files))
    assert exp.num_clients == 3
    assert [len(c.train) + len(c.test) for c in exp.clients.values()] == list(SIZES)
    assert exp.client_sizes == [(len(c.train), len(c.test)) for c in exp.clients.values()]
    assert exp.partition["method"] == "files" and exp.partition["sizes"] == list(SIZES)
    assert [sum(c) for c in exp.partition["label_counts"]] == list(SIZES)
    assert exp.eval is not None and len(exp.eval) == 40  # the server's own data: data.name's dev split


def test_flower_nodes_with_their_own_data_path_match_inprocess(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    a = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "inproc", files)
    b = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "nodes")  # the server's config names no file
    execute(a)
    # nodes in reverse order of their client ids: the client id comes from each node's own config
    grid = LocalGrid(3, node_configs=[{"client-id": i, "data-path": str(files[i])} for i in (2, 0, 1)])
    execute_with(b, local_grid_driver(grid), "flower")
    assert max_diff(adapter(a.run_dir), adapter(b.run_dir)) == 0.0
    rows_a, rows_b = load_run(a.run_dir).rows, load_run(b.run_dir).rows
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("clients", "bytes_up", "bytes_down", "train_loss", "eval/accuracy", "client_eval/accuracy"):
            assert ra.get(key) == rb.get(key), key
    part_a = json.loads((a.run_dir / "partition.json").read_text())
    part_b = json.loads((b.run_dir / "partition.json").read_text())
    for key in ("sizes", "label_counts", "num_clients"):
        assert part_a[key] == part_b[key], key
    # the simulation engine's nodes have only a partition-id: they read partition.files[partition-id]
    c = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "sim", files)
    execute_with(c, local_grid_driver(LocalGrid(3)), "flower")
    assert max_diff(adapter(a.run_dir), adapter(c.run_dir)) == 0.0


def test_the_server_opens_no_client_file(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """A ServerApp's experiment (holds="none") reads the model and its own data, never a client's file."""
    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    opened: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(Path(str(args[0])).resolve()) if not isinstance(args[0], bytes) else args[0].decode())

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one stops recording below
    try:
        server = build_experiment(files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "srv", files), holds="none")
        server_opened, opened[:] = set(opened), []
        node = build_experiment(files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "n1", files), holds=1)
    finally:
        watching[0] = False
    assert server.clients == {} and node.clients.keys() == {1}
    client_paths = {str(f.resolve()) for f in files}
    assert str(files[1].resolve()) in opened  # the hook sees the node's read...
    assert not client_paths & server_opened  # ...and the server read none
    assert not {str(files[0].resolve()), str(files[2].resolve())} & set(opened)  # nor node 1 another's file


def test_node_local_errors_are_one_line(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    cfg = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "e", files)
    with pytest.raises(FedtuneError, match="set data.labels"):
        build_experiment(cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": None})}))
    with pytest.raises(FedtuneError, match="client data file '.*missing.tsv' does not exist"):
        build_experiment(cfg, holds=0, data_path=str(tmp_path / "missing.tsv"))
    with pytest.raises(FedtuneError, match="client 1 has no data file"):
        build_experiment(files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "e"), holds=1)
    with pytest.raises(FedtuneError, match="label '7' is not one of 0, 1"):
        files[2].write_text(files[2].read_text() + "a new sentence\t7\n")
        build_experiment(cfg, holds=2)
    with pytest.raises(ValueError, match="partition.files is for partition.method=files"):
        tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "e", partition={"method": "iid", "files": ["a"]})
    with pytest.raises(ValueError, match="names 3 files"):
        tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "e",
                 partition={"method": "files", "num_clients": 2, "files": ["a", "b", "c"]})
    with pytest.raises(FedtuneError, match="pools every client's data"):
        build_experiment(cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"name": "centralized"})}))


def test_a_split_run_refuses_a_node_with_a_data_path(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "split")
    grid = LocalGrid(3, node_configs=[{"partition-id": 0}, {"partition-id": 1},
                                      {"partition-id": 2, "data-path": "x.tsv"}])
    with pytest.raises(FedtuneError, match="names a data-path, but the run splits data.name"):
        execute_with(cfg, local_grid_driver(grid), "flower")


def test_the_node_worker_answers_over_its_socket_and_keeps_its_experiment(tmp_path, tiny_model_dir,
                                                                          tiny_tsv_dataset):
    from fedtune.runtime import flower_node

    files = client_files(tmp_path / "nodes", tiny_tsv_dataset)
    cfg = files_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "w")
    hello = RecordDict({"fedtune": ConfigRecord({"run": json.dumps(cfg.to_dict(), sort_keys=True),
                                                 "action": "hello"})})
    node_config = {"client-id": 2, "data-path": str(files[2]), "model-root": str(tiny_model_dir)}
    worker = NodeWorker().start()
    try:
        content, state = worker_call(worker.folder, ("query", hello, node_config, None))
        report = dict(content["metrics"])
        assert report["client_id"] == 2 and report["train"] + report["test"] == SIZES[2] and state is None
        built = flower_node.kept_experiment()
        worker_call(worker.folder, ("query", hello, node_config, None))
        assert flower_node.kept_experiment() is built  # the second message reuses the experiment
        with pytest.raises(WorkerError, match="a node without a client-id .* this SuperNode has no client-id"):
            worker_call(worker.folder, ("query", hello, {"data-path": str(files[2])}, None))
    finally:
        worker.close()
    with pytest.raises(WorkerError, match="cannot reach this node's fedtune worker"):
        worker_call(worker.folder, ("query", hello, node_config, None))


def test_supernode_arguments(tmp_path, monkeypatch):
    assert parse_node_config('client-id=0 data-path=/a/b.tsv note="x y" w=0.5 on=true') == {
        "client-id": 0, "data-path": "/a/b.tsv", "note": "x y", "w": 0.5, "on": True}
    (tmp_path / "mine.tsv").write_text("sentence\tlabel\ngood\t1\n")
    monkeypatch.chdir(tmp_path)
    args = prepare_node_args(["--superlink", "h:1", "--node-config", "client-id=1 data-path=mine.tsv"], "/run/w")
    assert args == ["--superlink", "h:1", "--node-config",
                    f'client-id=1 data-path="{tmp_path / "mine.tsv"}" fedtune-worker="/run/w"',
                    "--max-wait-time", str(LINK_WAIT_S)]
    assert prepare_node_args(["--node-config=partition-id=1", "--max-wait-time", "5"], None) == [
        "--node-config=partition-id=1", "--max-wait-time", "5"]
    with pytest.raises(FedtuneError, match="data-path '.*other.tsv' does not exist"):
        prepare_node_args(["--node-config", "client-id=1 data-path=other.tsv"], None)
    with pytest.raises(FedtuneError, match="set by fedtune supernode itself"):
        prepare_node_args(["--node-config", "fedtune-worker=/x"], None)
