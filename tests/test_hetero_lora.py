"""Heterogeneous-rank LoRA algorithms: FedIT zero-padding, FLoRA, FLoRIST (merge / truncate), FlexLoRA.

Server and client halves are checked on a one-layer peft model against the
math of :mod:`fedtune.aggregation`; whole runs check ranks on the wire, byte
counts, and that both runtimes agree.
"""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedtune.aggregation import (
    dense_svd_factors,
    stack_factors,
    tensor_bytes,
    weighted_product_sum,
    zero_pad_mean,
)
from fedtune.algorithms import ClientContext, ClientUpdate, LoraSetup, build_algorithm
from fedtune.config import load_config
from fedtune.models.lora import MERGED, adapted_base_weights, fit_lora_rank, trainable_state

A_NAME = "base_model.model.lin.lora_A.default.weight"
B_NAME = "base_model.model.lin.lora_B.default.weight"
W_NAME = "base_model.model.lin.base_layer.weight"
SCALE = 2.0


class _One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 5, bias=False)

    def forward(self, x):
        return self.lin(x)


def _model(rank: int = 4):
    torch.manual_seed(0)
    return get_peft_model(_One(), LoraConfig(r=rank, lora_alpha=SCALE * rank, target_modules=["lin"]))


def _update(cid: int, rank: int, n: int, seed: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    return ClientUpdate(cid, {A_NAME: torch.randn(rank, 6, generator=g), B_NAME: torch.randn(5, rank, generator=g)}, n)


def _delta(updates):
    return weighted_product_sum([u.tensors[A_NAME] for u in updates], [u.tensors[B_NAME] for u in updates],
                                [u.num_examples for u in updates])


def _ctx(model, cid, state=None):
    return ClientContext(cid, 1, model, trainable_state(model), state if state is not None else {},
                         adapted_base_weights(model))


RANKS = (4, 2, 1)


def _algo(name, **options):
    return build_algorithm(name, options, LoraSetup(scale=SCALE, client_ranks=RANKS))


# --------------------------------------------------------------------------- server side


def test_fedit_zero_padding_with_equal_ranks_is_plain_fedit_and_pads_otherwise():
    ups = [_update(0, 4, 30, 1), _update(1, 4, 10, 2)]
    plain = build_algorithm("fedit").aggregate(1, ups, _state0())
    padded = build_algorithm("fedit", {}, LoraSetup(SCALE, (4, 4))).aggregate(1, ups, _state0())
    for k in (A_NAME, B_NAME):
        assert torch.equal(plain.global_tensors[k], padded.global_tensors[k])
    mixed = [_update(0, 4, 30, 1), _update(1, 2, 10, 2), _update(2, 1, 20, 3)]
    got = _algo("fedit").aggregate(1, mixed, _state0())
    A, B = zero_pad_mean([u.tensors[A_NAME] for u in mixed], [u.tensors[B_NAME] for u in mixed], [30, 10, 20])
    assert torch.allclose(got.global_tensors[A_NAME], A) and torch.allclose(got.global_tensors[B_NAME], B)
    assert _algo("fedit").configure(2, [2], got)[2].tensors[A_NAME].shape == (1, 6)  # cut to client 2's rank


def _state0():
    m = _model()
    return build_algorithm("fedit").init(trainable_state(m))


def test_flora_merges_the_exact_weighted_sum_of_products():
    algo = _algo("flora")
    state = algo.init(trainable_state(_model()))
    ups = [_update(0, 4, 30, 1), _update(1, 2, 10, 2), _update(2, 1, 20, 3)]
    state = algo.aggregate(1, ups, state)
    assert torch.allclose(state.global_tensors[MERGED + W_NAME], SCALE * _delta(ups), atol=1e-6)
    assert torch.count_nonzero(state.global_tensors[B_NAME]) == 0  # clients restart LoRA: B = 0
    assert state.metrics["kept_ranks"] == [7]  # R = 4 + 2 + 1


def test_florist_with_tau_one_reproduces_flora_and_flexlora_is_the_dense_svd():
    ups = [_update(0, 4, 30, 1), _update(1, 2, 10, 2), _update(2, 1, 20, 3)]
    flora = _algo("flora").aggregate(1, ups, _algo("flora").init(trainable_state(_model())))
    florist = _algo("florist", tau=1.0).aggregate(1, ups, _algo("florist").init(trainable_state(_model())))
    a, b = flora.global_tensors[MERGED + W_NAME], florist.global_tensors[MERGED + W_NAME]
    assert (a - b).norm() / a.norm() <= 1e-5

    flex = _algo("flexlora").aggregate(1, ups, _algo("flexlora").init(trainable_state(_model())))
    A, B = dense_svd_factors(_delta(ups), 4)  # kept at the largest client rank
    assert torch.allclose(flex.global_tensors[MERGED + W_NAME], SCALE * (B @ A), atol=1e-5)
    payloads = _algo("flexlora").configure(2, [0, 1, 2], flex)
    assert [payloads[c].tensors[A_NAME].shape[0] for c in (0, 1, 2)] == list(RANKS)


def test_florist_truncate_sends_each_client_the_global_factors_at_its_rank():
    algo = _algo("florist", tau=0.99, mode="truncate")
    ups = [_update(0, 4, 30, 1), _update(1, 2, 10, 2), _update(2, 1, 20, 3)]
    state = algo.aggregate(1, ups, algo.init(trainable_state(_model())))
    k = state.metrics["kept_ranks"][0]
    payloads = algo.configure(2, [0, 1, 2], state)
    assert [payloads[c].tensors[A_NAME].shape[0] for c in (0, 1, 2)] == list(RANKS)
    assert 1 <= k <= 7
    A_st, B_st = stack_factors([u.tensors[A_NAME] for u in ups], [u.tensors[B_NAME] for u in ups], [30, 10, 20])
    full = B_st @ A_st
    kept = state.global_tensors[MERGED + W_NAME] / SCALE
    assert (full - kept).norm() ** 2 <= (1 - 0.99) * full.norm() ** 2 + 1e-6  # the dropped energy is below 1 - τ


# --------------------------------------------------------------------------- client side


@pytest.mark.parametrize("name", ["flora", "florist"])
def test_a_client_that_missed_rounds_receives_every_merge_it_lacks(name):
    algo = _algo(name, tau=1.0) if name == "florist" else _algo(name)
    model = _model()
    state = algo.init(trainable_state(model))
    for rnd, clients in ((1, [0, 1]), (2, [0])):  # client 2 sits out rounds 1 and 2
        state = algo.aggregate(rnd, [_update(c, RANKS[c], 10 + c, 10 * rnd + c) for c in clients], state)
    payload = algo.configure(3, [2], state)[2]
    assert {k.split("/")[1] for k in payload.tensors if k.startswith("round/")} == {"1", "2"}
    ctx = _ctx(model, 2)
    w0 = ctx.base[W_NAME].clone()
    algo.prepare(ctx, payload)
    merged = state.global_tensors[MERGED + W_NAME]
    assert torch.allclose(ctx.state[MERGED + W_NAME], merged, atol=1e-5)
    params = dict(model.named_parameters())
    assert torch.allclose(params[W_NAME], w0 + merged, atol=1e-5)
    assert torch.count_nonzero(params[A_NAME][1:]) == 0  # rank-1 client: A's rows beyond 1 are zero
    algo.prepare(ctx, payload)  # a repeated delivery is not merged twice
    assert torch.allclose(ctx.state[MERGED + W_NAME], merged, atol=1e-5)
    assert int(ctx.state["synced"]) == 2


def test_merges_every_client_has_are_dropped_from_the_server_history():
    algo = _algo("flora")
    state = algo.init(trainable_state(_model()))
    for rnd in (1, 2):
        state = algo.aggregate(rnd, [_update(c, RANKS[c], 10, rnd + c) for c in range(3)], state)
    # after round 2 every client has merged round 1: only round 2's factors remain
    assert {k.split("/")[1] for k in state.extra if k.startswith("round/")} == {"2"}


def test_rank_r_client_in_a_larger_model_stays_rank_r_through_training():
    model = _model(4)
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[B_NAME].normal_()
    tensors = fit_lora_rank(fit_lora_rank(trainable_state(model), 2), 4)
    model.load_state_dict(tensors, strict=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.01)
    for _ in range(5):
        model(torch.randn(8, 6)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.count_nonzero(params[A_NAME][2:]) == 0 and torch.count_nonzero(params[B_NAME][:, 2:]) == 0
    assert torch.count_nonzero(params[A_NAME][:2]) > 0


# --------------------------------------------------------------------------- whole runs


def _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, algo, *extra):
    return load_config(None, [
        f"output_dir={tmp_path}", f"name={algo}", f"model.name={tiny_model_dir}", f"data.name={tiny_tsv_dataset}",
        "data.text_column=sentence", "data.label_column=label", "partition.num_clients=3",
        "lora.client_ranks=[4, 2, 1]", "lora.r=2", "lora.alpha=4", "federation.rounds=2", "train.local_steps=2",
        "train.batch_size=8", "train.lr=5e-3", f"algorithm.name={algo}", *extra,
    ])


@pytest.mark.parametrize("algo,options", [
    ("fedit", []), ("flora", []), ("florist", ["algorithm.options.tau=0.9"]),
    ("florist", ["algorithm.options.mode=truncate"]), ("flexlora", []),
])
def test_each_method_runs_and_counts_the_bytes_it_sends(tmp_path, tiny_model_dir, tiny_tsv_dataset, algo, options):
    from fedtune.experiment import build_experiment
    from fedtune.run import execute

    cfg = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, algo, *options)
    res = execute(cfg)
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    exp = build_experiment(cfg)
    modules = [n for n in exp.initial if n.endswith("lora_A.default.weight")]
    head = tensor_bytes({k: v for k, v in exp.initial.items() if "lora_" not in k})
    per_rank = sum(4 * (exp.initial[n].shape[1] + exp.initial[n.replace("lora_A", "lora_B")].shape[0])
                   for n in modules)  # bytes of one rank of every module's A and B
    assert rows[1]["bytes_up"] == 3 * head + sum(RANKS) * per_rank  # each client sends its own rank
    assert "eval/accuracy" in rows[-1]
    down2 = rows[2]["bytes_down"]
    merges = algo == "flora" or (algo == "florist" and options != ["algorithm.options.mode=truncate"])
    if merges:  # round 2 sends each of the 3 clients round 1's merge factors: rank R = 7 (FLoRA) or k per module
        kept = rows[1]["agg/kept_ranks"]  # every module here has the same shape
        assert down2 == 3 * head + 3 * sum(kept) * per_rank // len(modules)
    else:  # the global factors at each client's own rank
        assert down2 == 3 * head + sum(RANKS) * per_rank
    assert (res.run_dir / "adapter" / "adapter_config.json").is_file()
    if algo in ("flora", "florist", "flexlora"):
        assert (res.run_dir / "adapter" / "merged.safetensors").is_file()


def test_client_ranks_come_from_a_list_or_from_tiers_and_must_cover_every_client():
    from fedtune.errors import FedtuneError

    cfg = load_config(None, ["lora.rank_tiers=[{clients: 2, rank: 64}, {clients: 3, rank: 4}]"])
    assert cfg.lora.ranks(5) == [64, 64, 4, 4, 4]
    assert load_config(None).lora.ranks(5) is None
    with pytest.raises(FedtuneError, match="cover 5 clients but partition.num_clients is 8"):
        cfg.lora.ranks(8)
    with pytest.raises(FedtuneError, match="only one of lora.client_ranks and lora.rank_tiers"):
        load_config(None, ["lora.client_ranks=[4]", "lora.rank_tiers=[{clients: 1, rank: 4}]"])


def test_a_saved_flora_run_loads_with_its_merged_updates(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from safetensors.torch import load_file

    from fedtune.config import ModelConfig
    from fedtune.models.base import load_classifier
    from fedtune.models.lora import load_adapter
    from fedtune.run import execute

    res = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flora"))
    base, _ = load_classifier(ModelConfig(name=str(tiny_model_dir)), num_labels=2)
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = load_adapter(base, res.run_dir)
    merged = load_file(res.run_dir / "adapter" / "merged.safetensors")
    params = dict(model.named_parameters())
    for key, delta in merged.items():
        name = key[len(MERGED):]
        plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.allclose(params[name], w0[plain] + delta, atol=1e-6)
    with pytest.raises(Exception, match="no peft adapter"):
        load_adapter(base, tmp_path / "nowhere")


# --------------------------------------------------------------------------- options, through the algorithm

E = torch.eye(6)


def _known_spectrum():
    """Two rank-2 clients of equal size (p = 1/2) on orthogonal directions: ΔW = Σ p_i B_i A_i has
    σ = (4, 2, 1, 0.5) along e_1..e_4, energies 16, 4, 1, 0.25 (cumulative 75.3 %, 94.1 %, 98.8 %, 100 %)."""
    ups = [ClientUpdate(0, {A_NAME: E[[0, 1]], B_NAME: E[:5, [0, 1]] * torch.tensor([8.0, 4.0])}, 10),
           ClientUpdate(1, {A_NAME: E[[2, 3]], B_NAME: E[:5, [2, 3]] * torch.tensor([2.0, 1.0])}, 10)]
    return ups


def _top(k: int) -> torch.Tensor:
    """The best rank-k part of the known ΔW (unscaled)."""
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5])
    return E[:5, :k] @ torch.diag(sigma[:k]) @ E[:k]


def _from_config(*options: str):
    from fedtune.experiment import algorithm_for

    return algorithm_for(load_config(None, [
        "algorithm.name=florist", "partition.num_clients=2", "lora.client_ranks=[2, 2]", "lora.r=2", "lora.alpha=4",
        *(f"algorithm.options.{o}" for o in options)]))


@pytest.mark.parametrize("mode", ["merge", "truncate"])
@pytest.mark.parametrize("tau,k", [(0.5, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)])
def test_florist_keeps_the_fewest_directions_holding_tau_of_the_energy(mode, tau, k):
    algo = build_algorithm("florist", {"tau": tau, "mode": mode}, LoraSetup(scale=SCALE, client_ranks=(2, 2)))
    state = algo.aggregate(1, _known_spectrum(), algo.init(trainable_state(_model(2))))
    assert state.metrics["kept_ranks"] == [k]  # the stack has rank 4
    factor = "round/1/base_model.model.lin/A" if mode == "merge" else "global/base_model.model.lin/A"
    assert state.extra[factor].shape == (k, 6)
    assert torch.allclose(state.global_tensors[MERGED + W_NAME], SCALE * _top(k), atol=1e-6)


def test_florist_tau_and_mode_from_a_config_reach_the_aggregation():
    ups = _known_spectrum()
    for options, k in (((), 2), (("tau=0.5",), 1), (("tau=0.95",), 3)):  # the default τ is 0.9
        algo = _from_config(*options)
        state = algo.aggregate(1, ups, algo.init(trainable_state(_model(2))))
        assert state.metrics["kept_ranks"] == [k]
        assert torch.allclose(state.global_tensors[MERGED + W_NAME], 2.0 * _top(k), atol=1e-6)  # s = 4 / 2

    merge, truncate = _from_config("mode=merge"), _from_config("mode=truncate")
    sent = {}
    for algo in (merge, truncate):
        state = algo.aggregate(1, ups, algo.init(trainable_state(_model(2))))
        sent[algo] = algo.configure(2, [0], state)[0].tensors
    # merge: client 0 gets round 1's rank-2 update to merge into W, and restarts LoRA from B = 0
    assert sent[merge]["round/1/base_model.model.lin/A"].shape == (2, 6) and B_NAME not in sent[merge]
    # truncate: client 0 continues from the global rank-2 factors, B·A = the top-2 part of ΔW
    assert torch.allclose(sent[truncate][B_NAME] @ sent[truncate][A_NAME], _top(2), atol=1e-6)
    assert not any(k.startswith("round/") for k in sent[truncate])


# --------------------------------------------------------------------------- FlexLoRA as the reference code scores it

def test_flexlora_scores_each_clients_own_truncation_weighted_by_data_as_the_reference_code():
    """FLoRIST's code (Anonymous-user-00/FLoRIST): fed_utils/model_aggregation.py:95-135 makes client i's adapter
    from the data-weighted sum of products, ΔW = Σ_k w_k B_k A_k, by an SVD cut at the client's own rank
    (B_new = U_k S_k, A_new = V_k); main.py:489-508 scores each client's model and reports
    Σ_i w_i acc_i with w = normalize(local_dataset_len_dict of the selected clients, p=1)."""
    from fedtune.runtime.server import weighted_model_metrics

    algo = _algo("flexlora")
    updates = [_update(0, 4, 10, 1), _update(1, 2, 30, 2), _update(2, 1, 20, 3)]
    state = algo.aggregate(1, updates, algo.init(trainable_state(_model(4))))
    w = torch.nn.functional.normalize(torch.tensor([10.0, 30.0, 20.0]), p=1, dim=0)
    ba = sum(wk * (u.tensors[B_NAME] @ u.tensors[A_NAME]) for wk, u in zip(w, updates))
    U, S, Vt = torch.linalg.svd(ba, full_matrices=False)
    models = algo.evaluation_models(state)
    assert algo.evaluation_weights(state) == {"rank_4": 10.0, "rank_2": 30.0, "rank_1": 20.0}
    for u, rank in zip(updates, RANKS):
        B_new, A_new = U[:, :rank] @ torch.diag(S[:rank]), Vt[:rank, :]
        mine = models[f"rank_{rank}"][MERGED + W_NAME]
        assert torch.allclose(mine, SCALE * (B_new @ A_new), atol=1e-5)
        assert torch.allclose(algo.configure_evaluate([u.client_id], state)[u.client_id][MERGED + W_NAME], mine)
    client_acc = torch.tensor([0.9, 0.6, 0.3])  # each client's model's accuracy, as if scored
    scored = {f"rank_{r}": {"accuracy": float(a), "n": 100} for r, a in zip(RANKS, client_acc)}
    assert weighted_model_metrics(scored, algo.evaluation_weights(state))["accuracy"] == pytest.approx(
        float(torch.sum(w * client_acc)))
    server = _algo("flexlora", evaluate="server_model")
    assert list(server.evaluation_models(server.aggregate(1, updates, server.init(trainable_state(_model(4)))))) == [""]


def test_flexlora_run_logs_each_ranks_score_and_their_weighted_mean(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.run import execute

    res = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flexlora", "federation.rounds=1",
                       "eval.every=1"))
    row = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    sizes = json.loads((res.run_dir / "partition.json").read_text())["sizes"]
    ranks = {f"rank_{r}": n for r, n in zip(RANKS, sizes)}
    assert set(ranks) <= {k.split("/")[1] for k in row if k.startswith("eval/rank_")}
    want = sum(n * row[f"eval/{name}/accuracy"] for name, n in ranks.items()) / sum(sizes)
    assert row["eval/accuracy"] == pytest.approx(want)


# --------------------------------------------------------------------------- FFA-LoRA

def test_ffa_averages_b_alone_which_is_exact_for_the_shared_a():
    """FFA-LoRA (Sun et al., ICLR 2024): A₀ frozen and shared, so Σ p_i B_i A₀ = (Σ p_i B_i) A₀ at any ranks."""
    algo = _algo("ffa")
    initial = trainable_state(_model(4))
    a0 = initial[A_NAME]
    g = torch.Generator().manual_seed(4)
    updates = [ClientUpdate(c, {B_NAME: torch.randn(5, r, generator=g)}, n) for c, r, n in zip(range(3), RANKS, (1, 3, 4))]
    state = algo.aggregate(1, updates, algo.init(initial))
    assert torch.equal(state.global_tensors[A_NAME], a0)
    exact = sum(n / 8 * u.tensors[B_NAME] @ a0[:r] for u, r, n in zip(updates, RANKS, (1, 3, 4)))
    assert torch.allclose(state.global_tensors[B_NAME] @ a0, exact, atol=1e-6)
    payload = algo.configure(2, [1], state)[1].tensors
    assert set(payload) == {B_NAME} and payload[B_NAME].shape == (5, 2)


def test_ffa_run_never_trains_or_sends_a(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from safetensors.torch import load_file

    from fedtune.experiment import build_experiment
    from fedtune.run import execute

    cfg = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "ffa")
    res = execute(cfg)
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    exp = build_experiment(cfg)
    b_names = [n for n in exp.initial if "lora_B" in n]
    head = tensor_bytes({k: v for k, v in exp.initial.items() if "lora_" not in k})
    per_rank = sum(4 * exp.initial[n].shape[0] for n in b_names)  # one column of every B
    assert rows[1]["bytes_up"] == rows[2]["bytes_down"] == 3 * head + sum(RANKS) * per_rank
    saved = load_file(res.run_dir / "adapter" / "adapter_model.safetensors")
    a_saved = {k: v for k, v in saved.items() if "lora_A" in k}
    a_initial = [v for k, v in exp.initial.items() if "lora_A" in k]
    assert len(a_saved) == len(a_initial) and all(any(torch.equal(v, a) for a in a_initial) for v in a_saved.values())
    assert "eval/accuracy" in rows[-1]
