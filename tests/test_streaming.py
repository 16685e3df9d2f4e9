"""The server's memory for a round does not grow with the number of clients: updates are checked and folded
into the mean as they arrive, on the in-process engine and through Flower's pool, and none is kept.

Counted, not timed: every update made is tracked by a weak reference, and the most updates alive at once
during a round is the same for 10 and for 100 clients. An algorithm that needs them all (clustering) holds
them all, as it says.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedtune.algorithms import ClientUpdate, Payload, ServerState, build_algorithm
from fedtune.config import RunConfig
from fedtune.runtime.flower_server import FlowerPool
from fedtune.runtime.server import RoundIntake
from fedtune.runtime.wire import tensors_to_record

SIZE = 4096
W = "layer.lora_B.weight"  # a LoRA factor's name, which clustering compares clients on


class Alive:
    """Weak references to every update made: how many are alive, at most, while a round runs."""

    def __init__(self):
        self.refs: list[weakref.ref] = []
        self.most = 0

    def track(self, obj):
        self.refs.append(weakref.ref(obj))
        self.sample()
        return obj

    def sample(self) -> None:
        self.most = max(self.most, sum(r() is not None for r in self.refs))


def _fake_exp(algo, n, guard: bool = True):
    cfg = RunConfig.model_validate({} if guard else {"federation": {"max_update_ratio": 0}})
    return SimpleNamespace(algorithm=algo, client_sizes=[(10, 0)] * n, cfg=cfg)


def _updates(n: int, alive: Alive):
    for cid in range(n):
        torch.manual_seed(cid)
        yield alive.track(ClientUpdate(cid, {W: torch.randn(SIZE), "b": torch.randn(8)}, 10))
        alive.sample()


def _round(name: str, n: int, previous: list[float], guard: bool = True) -> int:
    """The most updates alive at once while ``name`` aggregates a round of ``n`` clients in-process."""
    algo = build_algorithm(name, {"n_clusters": 2} if name == "clustered" else None, num_clients=n)
    start = {W: torch.zeros(SIZE), "b": torch.zeros(8)}
    state = algo.init(start)
    payloads = {c: Payload(tensors=start) for c in range(n)}
    alive = Alive()
    intake = RoundIntake(_fake_exp(algo, n, guard), 1 if name != "clustered" else algo.options.cluster_round, payloads,
                         state, previous, tolerate=False, now=lambda: 0.0)
    algo.aggregate(1, intake.accepted(_updates(n, alive)), state)
    intake.drain()
    assert sorted(intake.accepted_ids) == list(range(n))
    return alive.most


@pytest.mark.parametrize("name", ["fedit", "fedadam", "scaffold"])
def test_a_mean_round_holds_a_constant_number_of_updates(name, monkeypatch):
    if name == "scaffold":  # its updates carry Δc_i: give them their side channel
        monkeypatch.setattr("test_streaming._updates", _scaffold_updates)
    previous = [1.0, 1.0, 1.0]  # the guard judges each update as it arrives
    assert _round(name, 10, previous) == _round(name, 100, previous) <= 2


def _scaffold_updates(n: int, alive: Alive):
    for cid in range(n):
        torch.manual_seed(cid)
        w, b = torch.randn(SIZE), torch.randn(8)
        yield alive.track(ClientUpdate(cid, {W: w, "b": b, f"scaffold/delta_c/{W}": torch.randn(SIZE),
                                             "scaffold/delta_c/b": torch.randn(8)}, 10))
        alive.sample()


def test_the_first_round_holds_its_updates_for_the_guard_and_clustering_holds_them_all():
    assert _round("fedit", 10, []) == 10 and _round("fedit", 100, []) == 100  # no previous changes to judge by
    assert _round("clustered", 40, [1.0] * 3) == 40  # clustering compares every update of its round


def test_the_first_round_holds_nothing_with_the_guard_off():
    assert _round("fedit", 10, [], guard=False) == _round("fedit", 100, [], guard=False) <= 2


class LazyGrid:
    """A Flower Grid whose nodes answer one reply per pull, made only when it is pulled (as replies trickle in)."""

    def __init__(self, n: int, alive: Alive):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp process has them
        self.n, self.alive = n, alive
        self.pending: list[Message] = []

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            ids.append(f"m{i}")
            self.pending.append(msg)
        return ids

    def pull_messages(self, message_ids):
        if not self.pending:
            return []
        msg = self.pending.pop(0)
        cid = int(msg.content["fedtune"]["client_id"])
        torch.manual_seed(cid)
        tensors = {W: torch.randn(SIZE), "b": torch.randn(8)}
        content = RecordDict({"update": tensors_to_record(tensors),
                              "metrics": MetricRecord({"client_id": cid, "num_examples": 10, "state_tensors": 0})})
        return [Message(content, reply_to=msg)]


def test_the_flower_pool_decodes_and_passes_on_one_reply_at_a_time():
    most = {}
    for n in (10, 100):
        alive = Alive()
        pool = FlowerPool.__new__(FlowerPool)  # its discovery is not under test here
        pool.grid, pool.timeout_s, pool.run_json = LazyGrid(n, alive), 60.0, "{}"
        pool.node_of = {c: c + 1 for c in range(n)}
        pool.client_of = {c + 1: c for c in range(n)}
        pool.stateful_clients = set()
        algo = build_algorithm("fedit", num_clients=n)
        start = {W: torch.zeros(SIZE), "b": torch.zeros(8)}
        state = algo.init(start)
        payloads = {c: Payload(tensors=start) for c in range(n)}
        intake = RoundIntake(_fake_exp(algo, n), 1, payloads, state, [1.0] * 3, tolerate=False, now=lambda: 0.0)

        def tracked(updates):
            for u in updates:
                yield alive.track(u)
                alive.sample()

        algo.aggregate(1, tracked(intake.accepted(pool.train(1, payloads, 0.1))), state)
        assert sorted(intake.accepted_ids) == list(range(n)) and pool.round_bytes[0] == n * (SIZE + 8) * 4
        most[n] = alive.most
    assert most[10] == most[100] <= 2
