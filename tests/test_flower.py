"""The Flower runtime: same round loop, same client half, same results as in-process.

The fast tests drive :class:`FlowerPool` through :class:`LocalGrid`, a Grid
that hands each Message to the real ClientApp in this process (one Context
per node, as a SuperNode keeps it), so failures and timeouts can be injected.
``test_flower_simulation_matches_inprocess`` runs Flower's real simulation
engine (Ray actors) and is the slow one.
"""

import itertools
import json
import math
import uuid

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from safetensors.torch import load_file

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.experiment import build_experiment
from fedtune.run import execute, execute_with
from fedtune.runlog import load_run
from fedtune.runtime.server import ClientFailed
from fedtune.runtime.flower_server import FlowerPool
from fedtune.runtime.flower_client import clientapp
from fedtune.runtime.wire import record_tensor_bytes, record_to_tensors, tensors_to_record


def tiny_cfg(tmp_path, model_dir, data_dir, name, **over) -> RunConfig:
    cfg = dict(
        name=name, output_dir=str(tmp_path / "runs"), seed=3, threads=1,
        data=dict(name=str(data_dir), text_column="sentence", label_column="label"),
        partition=dict(method="iid", num_clients=3),
        model=dict(name=str(model_dir), max_length=32),
        lora=dict(r=4, alpha=8),
        train=dict(local_steps=3, batch_size=8, lr=2e-2),
        federation=dict(rounds=2),
        eval=dict(every=1, batch_size=32),
    )
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section] = {**cfg[section], field: value}
        else:
            cfg[section] = value
    return RunConfig.model_validate(cfg)


class LocalGrid:
    """A Flower Grid whose nodes run :data:`clientapp` in this process.

    ``node_configs``: one node config per node (default: ``partition-id`` 0..n-1, a split dataset).

    ``fail``: {(round, client): "error" | "gone" | "drop" | "nan" | a function}: reply with the error a SuperNode
    sends when the ClientApp raised, with the SuperLink's error for a node that went away, send no reply (a
    timeout), reply with NaN tensors, or with what the function makes of the real reply's content (a node that
    sends what it likes). Round 0 is the initial evaluation: ``(0, client)`` with "error" makes every evaluate
    message of that client fail.
    """

    def __init__(self, num_nodes: int, fail=None, node_configs=None):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp process has them
        ids = itertools.count(1000, 7)
        node_configs = node_configs or [{"partition-id": pid, "num-partitions": num_nodes} for pid in range(num_nodes)]
        self.contexts = {
            next(ids): Context(run_id=1, node_id=0, node_config=dict(nc), state=RecordDict(), run_config={})
            for nc in node_configs
        }
        self.fail = fail or {}
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        ids = self.push_messages(messages)
        return self.pull_messages(ids)

    def push_messages(self, messages):
        """Answer each message at once (as its node would), keeping the replies until they are pulled."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            self.sent.append(msg)
            reply = self._answer(msg)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]

    def _answer(self, msg):
        ctx = self.contexts[msg.metadata.dst_node_id]
        key = None
        if msg.metadata.message_type in ("train", "evaluate"):
            meta = msg.content["fedtune"]
            key = self.fail.get((int(meta.get("round", 0)), int(meta["client_id"])))
        if key == "drop":
            return None
        if key == "error":
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="injected failure"), reply_to=msg)
        if key == "gone":
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node went away"), reply_to=msg)
        try:
            reply = clientapp(msg, ctx)
        except Exception as e:  # as a SuperNode does: the exception becomes an error reply
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}"),
                           reply_to=msg)
        if key == "nan":
            tensors = record_to_tensors(reply.content["update"])
            reply.content["update"] = tensors_to_record({k: torch.full_like(v, math.nan) for k, v in tensors.items()})
        elif callable(key):
            reply = Message(key(reply.content), reply_to=msg)
        return reply


def local_grid_driver(grid):
    return lambda exp, hooks, body: body(FlowerPool(grid, exp, timeout_s=exp.cfg.federation.round_timeout_s))


def adapter(run_dir, sub="adapter"):
    return load_file(run_dir / sub / "adapter_model.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------------------------------------------- records


def test_records_round_trip_dtypes_and_count_tensor_bytes():
    tensors = {"a.lora_A.weight": torch.randn(4, 32), "b": torch.randn(3, dtype=torch.float64),
               "c": torch.randn(2, 5).to(torch.bfloat16), "d": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    record = tensors_to_record(tensors)
    back = record_to_tensors(record)
    assert list(back) == list(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    assert record_tensor_bytes(record) == 4 * 32 * 4 + 3 * 8 + 10 * 2 + 6 * 8
    assert record.count_bytes() > record_tensor_bytes(record)  # serialised: + the layout (names, dtypes, shapes)
    assert len(record) == 1  # one packed Array: one object on Flower's wire, however many tensors
    assert record_to_tensors(tensors_to_record({})) == {}
    scalar = record_to_tensors(tensors_to_record({"s": torch.tensor(2.5), "e": torch.zeros(0, 3)}))
    assert scalar["s"].shape == () and scalar["s"].item() == 2.5 and scalar["e"].shape == (0, 3)


# --------------------------------------------------------------------------- FlowerPool over a local Grid


def test_flower_pool_matches_inprocess_for_a_stateful_personalised_algorithm(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """LocalOnly keeps each client's adapters in the node's Context.state and is evaluated per client."""
    over = dict(algorithm={"name": "local"}, partition__client_test_fraction=0.25)
    a = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "inproc", **over)
    b = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "grid", **over)
    execute(a)
    grid = LocalGrid(3)
    execute_with(b, local_grid_driver(grid), "flower")
    for cid in range(3):
        pa, pb = adapter(a.run_dir, f"adapters/client_{cid}"), adapter(b.run_dir, f"adapters/client_{cid}")
        assert max_diff(pa, pb) <= 1e-6
    rows_a, rows_b = load_run(a.run_dir).rows, load_run(b.run_dir).rows
    assert [r.get("client_eval/accuracy") for r in rows_a] == pytest.approx([r.get("client_eval/accuracy") for r in rows_b])
    assert all(r["bytes_up"] == r["bytes_down"] == 0 for r in rows_b)  # nothing is shared
    # personal adapters moved away from the common initialisation
    pa0 = adapter(a.run_dir, "adapters/client_0")
    assert max(v.abs().max().item() for k, v in pa0.items() if "lora_B" in k) > 0
    # the state lives on the nodes, never in the checkpoint of a Flower run
    meta = json.loads((b.run_dir / "checkpoint" / "checkpoint.json").read_text())
    assert meta["has_client_states"] is False and meta["clients_with_state_on_nodes"] == [0, 1, 2]


def test_flower_pool_matches_inprocess_for_flora_with_mixed_ranks_and_partial_participation(
        tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """FLoRA keeps merged base-weight updates on the nodes; clients that sat out receive the merges they missed."""
    over = dict(algorithm={"name": "flora"}, lora={"r": 2, "alpha": 4, "client_ranks": [4, 2, 1]},
                federation={"rounds": 3, "clients_per_round": 2})
    a = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "inproc", **over)
    b = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "grid", **over)
    execute(a)
    execute_with(b, local_grid_driver(LocalGrid(3)), "flower")
    merged_a = load_file(a.run_dir / "adapter" / "merged.safetensors")
    assert max_diff(merged_a, load_file(b.run_dir / "adapter" / "merged.safetensors")) <= 1e-6
    assert max(v.abs().max().item() for v in merged_a.values()) > 1e-5
    rows_a, rows_b = load_run(a.run_dir).rows, load_run(b.run_dir).rows
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("clients", "bytes_up", "bytes_down", "eval/accuracy"):
            assert ra.get(key) == rb.get(key), key


def test_failed_and_late_clients_are_missing_and_nan_updates_rejected(tmp_path, tiny_model_dir, tiny_tsv_dataset, caplog):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "faults", federation={
        "rounds": 3, "tolerate_client_failures": True, "round_timeout_s": 2})  # LocalGrid answers at once
    grid = LocalGrid(3, fail={(1, 1): "error", (2, 0): "drop", (2, 2): "nan"})
    execute_with(cfg, local_grid_driver(grid), "flower")
    rows = load_run(cfg.run_dir).rows
    assert (rows[1]["clients"], rows[1]["missing"], rows[1]["rejected"]) == ([0, 2], [1], [])
    assert (rows[2]["clients"], rows[2]["missing"], rows[2]["rejected"]) == ([1], [0], [2])
    assert (rows[3]["clients"], rows[3]["missing"], rows[3]["rejected"]) == ([0, 1, 2], [], [])
    per_client = rows[3]["bytes_up"] // 3
    assert rows[1]["bytes_up"] == 2 * per_client  # two replies arrived
    assert rows[2]["bytes_up"] == 2 * per_client  # the NaN one was received (then rejected)
    assert all(r["bytes_down"] == 3 * per_client for r in rows[1:])  # every payload was sent
    final = adapter(cfg.run_dir)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert "client 1 failed: injected failure" in caplog.text
    assert "rejected the update of client 2: tensor" in caplog.text and "has non-finite values" in caplog.text
    lost = [(p["round"], p["client"], p["phase"], p["kind"]) for p in
            json.loads((cfg.run_dir / "summary.json").read_text())["client_problems"]]
    assert lost == [(1, 1, "train", "failed"), (2, 0, "train", "dropped"), (2, 2, "train", "rejected")]


def test_a_raising_flower_client_fails_the_run_with_its_error(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "raises")
    with pytest.raises(ClientFailed, match=r"^round 2: client 1 failed in train: injected failure \(set "
                                            r"federation.tolerate_client_failures: true"):
        execute_with(cfg, local_grid_driver(LocalGrid(3, fail={(2, 1): "error"})), "flower")
    assert load_run(cfg.run_dir).rows[-1]["round"] == 1


def test_clients_failing_to_evaluate_are_named_not_silently_averaged_out(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    over = dict(federation={"rounds": 1}, partition={"method": "iid", "num_clients": 3, "client_test_fraction": 0.3},
                eval={"every": 1, "batch_size": 32, "per_client": True})
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "evalfail", **over)
    with pytest.raises(ClientFailed, match="round 0: client 2 failed in evaluate"):
        execute_with(cfg, local_grid_driver(LocalGrid(3, fail={(0, 2): "error"})), "flower")
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "evalgone", **over)
    execute_with(cfg, local_grid_driver(LocalGrid(3, fail={(0, 1): "gone"})), "flower")
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert [(p["round"], p["client"], p["phase"], p["kind"], p["reason"]) for p in summary["client_problems"]] == [
        (0, 1, "evaluate", "dropped", "node went away"), (1, 1, "evaluate", "dropped", "node went away")]


def test_too_few_updates_stop_the_run_naming_the_clients(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "fewer", federation={"rounds": 2, "min_clients_per_round": 3})
    grid = LocalGrid(3, fail={(2, 1): "gone"})
    with pytest.raises(FedtuneError, match=r"round 2: only 2 usable updates .*missing \[1\].*node went away"):
        execute_with(cfg, local_grid_driver(grid), "flower")
    assert load_run(cfg.run_dir).rows[-1]["round"] == 1  # round 1 completed and is checkpointed
    assert json.loads((cfg.run_dir / "checkpoint" / "checkpoint.json").read_text())["round"] == 1


def test_min_clients_above_the_sample_is_an_error(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "bad",
                   federation={"rounds": 1, "clients_per_round": 2, "min_clients_per_round": 3})
    with pytest.raises(FedtuneError, match="min_clients_per_round=3 exceeds the 2 clients"):
        execute(cfg)


def _flaky_inprocess(monkeypatch):
    """Client 2 raises in round 1, in-process."""
    import fedtune.runtime.inprocess as inprocess

    real = inprocess.client_round

    def flaky(exp, cid, rnd, *args, **kw):
        if (rnd, cid) == (1, 2):
            raise RuntimeError("disk full")
        return real(exp, cid, rnd, *args, **kw)

    monkeypatch.setattr(inprocess, "client_round", flaky)


def test_inprocess_client_exception_fails_the_run_with_its_error(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                  monkeypatch):
    _flaky_inprocess(monkeypatch)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flaky")
    with pytest.raises(ClientFailed, match="round 1: client 2 failed in train") as err:
        execute(cfg)
    assert "Traceback" in str(err.value) and "RuntimeError: disk full" in str(err.value)  # the client's own error
    assert [r["round"] for r in load_run(cfg.run_dir).rows] == [0]


def test_inprocess_client_failure_tolerated_is_named_in_summary_and_report(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                            monkeypatch):
    from fedtune.report import build_report, left_out_lines

    _flaky_inprocess(monkeypatch)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flaky", federation={
        "rounds": 2, "tolerate_client_failures": True})
    execute(cfg)
    rows = load_run(cfg.run_dir).rows
    assert (rows[1]["clients"], rows[1]["missing"]) == ([0, 1], [2])
    assert rows[2]["clients"] == [0, 1, 2]
    [lost] = json.loads((cfg.run_dir / "summary.json").read_text())["client_problems"]
    assert (lost["round"], lost["client"], lost["phase"], lost["kind"]) == (1, 2, "train", "failed")
    assert lost["reason"].rstrip().endswith("RuntimeError: disk full")
    assert left_out_lines(build_report([cfg.run_dir]).rows) == [
        "flaky: round 1, client 2 failed in train: RuntimeError: disk full"]


def test_a_node_without_partition_id_is_named(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "nopid")
    grid = LocalGrid(3)
    first = next(iter(grid.contexts))
    grid.contexts[first].node_config = {}
    with pytest.raises(FedtuneError, match="1 node could not start its client: node [0-9]+: FedtuneError: this SuperNode has no partition-id"):
        execute_with(cfg, local_grid_driver(grid), "flower")


# --------------------------------------------------------------------------- the real simulation engine


def test_flower_simulation_matches_inprocess(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """Same seeded FedIT run, in-process and on Flower's simulation engine: same adapters, same bytes."""
    a = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "inproc")
    b = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flower")
    execute(a)
    execute(b, runtime="flower")

    ga, gb = adapter(a.run_dir), adapter(b.run_dir)
    assert max_diff(ga, gb) <= 1e-6
    assert max(v.abs().max().item() for k, v in ga.items() if "lora_B" in k) > 1e-4  # training moved B off zero
    ca = load_file(a.run_dir / "checkpoint" / "state.safetensors")
    cb = load_file(b.run_dir / "checkpoint" / "state.safetensors")
    assert max_diff({k: v for k, v in ca.items() if k.startswith("global/")}, cb) <= 1e-6

    rows_a, rows_b = load_run(a.run_dir).rows, load_run(b.run_dir).rows
    exp = build_experiment(a)
    per_client = sum(t.numel() * t.element_size() for t in exp.initial.values())
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("round", "clients", "missing", "rejected", "bytes_up", "bytes_down", "cum_bytes_up",
                    "cum_bytes_down", "train_examples"):
            assert ra.get(key) == rb.get(key), key
        assert ra["eval/accuracy"] == rb["eval/accuracy"]
        assert ra["eval/loss"] == pytest.approx(rb["eval/loss"], abs=1e-6)
        if ra["round"]:
            assert rb["bytes_up"] == rb["bytes_down"] == 3 * per_client
            assert rb["wire_bytes_up"] > rb["bytes_up"]  # measured from the serialised ArrayRecords
            assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
    assert load_run(b.run_dir).summary["runtime"] == "flower"
