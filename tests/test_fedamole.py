"""FedAMoLE: experts aggregated over their holders, exact bytes, routing embeddings, ablations, both runtimes."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedtune.aggregation import tensor_bytes
from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.models.mole import expert_names, held_experts, is_expert


def _cfg(tmp_path, model, data, *extra):
    bounds = [] if "algorithm.options.homo_arch=true" in extra else [
        "algorithm.options.min_experts=2", "algorithm.options.max_experts=3"]
    return load_config(None, [
        f"output_dir={tmp_path}", "name=amole", f"model.name={model}", f"data.name={data}",
        "data.text_column=sentence", "data.label_column=label", "partition.num_clients=3",
        "partition.client_test_fraction=0.25", "partition.client_aux_fraction=0.2", "model.finetune=mole",
        "mole.num_experts=4", "algorithm.name=fedamole", *bounds, "federation.rounds=2", "train.local_steps=2",
        "train.batch_size=8", "train.lr=1e-2", "threads=1", *extra,
    ])


def _run(cfg, pool_cls=None):
    from fedtune.experiment import build_experiment
    from fedtune.runlog import RunLog
    from fedtune.runtime.inprocess import InProcessPool
    from fedtune.runtime.server import run_rounds

    exp = build_experiment(cfg)
    pool = (pool_cls or InProcessPool)(exp)
    state, _ = run_rounds(exp, pool, RunLog(cfg.run_dir))
    return exp, pool, state


def test_each_expert_is_the_mean_over_its_holders_and_the_rest_over_everyone():
    from fedtune.algorithms import ClientUpdate, ServerState, build_algorithm

    algo = build_algorithm("fedamole", {"min_experts": 1, "max_experts": 2}, num_clients=2)
    module = "m"
    names = [n for e in range(2) for n in expert_names(module, e)]
    initial = {n: torch.zeros(2, 3) if n.endswith("A") else torch.zeros(3, 2) for n in names}
    initial["m.shared.A"], initial["head.weight"] = torch.zeros(2, 3), torch.zeros(1)
    state = algo.init(initial)

    def update(cid, experts, value):
        tensors = {n: torch.full_like(initial[n], value) for e in experts for n in expert_names(module, e)}
        tensors.update({"m.shared.A": torch.full((2, 3), value), "head.weight": torch.full((1,), value)})
        tensors.update({"rsea/token/m": torch.ones(2), "rsea/expert/m": torch.ones(len(experts), 2),
                        "rsea/ids/m": torch.tensor(experts)})
        return ClientUpdate(cid, tensors, 10)

    new = algo.aggregate(1, [update(0, [0], 1.0), update(1, [0], 3.0)],
                         ServerState(0, state.global_tensors, state.extra))
    assert torch.all(new.global_tensors["m.experts.0.A"] == 2.0)  # both held expert 0
    assert torch.all(new.global_tensors["m.experts.1.A"] == 0.0)  # nobody held expert 1: unchanged
    assert torch.all(new.global_tensors["m.shared.A"] == 2.0) and new.global_tensors["head.weight"] == 2.0


def test_a_client_receives_and_sends_exactly_its_experts_shared_router_and_head(tmp_path, tiny_model_dir,
                                                                                tiny_tsv_dataset):
    from fedtune.runtime.inprocess import InProcessPool

    seen = []

    class Watching(InProcessPool):
        def train(self, rnd, payloads, lr):
            out = []
            seen.append((rnd, payloads, out))
            for u in super().train(rnd, payloads, lr):
                out.append(u)
                yield u

    cfg = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset)
    exp, _, state = _run(cfg, Watching)
    shared = {n for n in exp.initial if not is_expert(n)}
    assert any("token_proj" in n for n in shared) and any("classifier" in n for n in shared)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    for rnd, payloads, updates in seen:
        for cid, p in payloads.items():
            experts = {n for n in p.tensors if is_expert(n)}
            assert set(p.tensors) == shared | experts
            assert all(2 <= len(held) <= 3 for held in held_experts(p.tensors).values())  # min/max per module
            u = next(u for u in updates if u.client_id == cid)
            model_part = {n for n in u.tensors if not n.startswith("rsea/")}
            assert model_part == set(p.tensors)  # it sends back what it holds, nothing more
            ids = torch.cat([u.tensors[n] for n in u.tensors if n.startswith("rsea/ids/")])
            assert len(ids) == len(experts) // 2
        up = sum(tensor_bytes(u.tensors) for u in updates)
        down = sum(tensor_bytes(p.tensors) for p in payloads.values())
        assert (rows[rnd]["bytes_up"], rows[rnd]["bytes_down"]) == (up, down)


def test_the_assignment_meets_its_bounds_and_the_ablations_change_it_as_they_say(tmp_path, tiny_model_dir,
                                                                                 tiny_tsv_dataset):
    def assignments(*extra):
        cfg = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "federation.rounds=3", f"name=x{len(runs)}", *extra)
        runs.append(cfg)
        exp, _, state = _run(cfg)
        return {k: v.clone() for k, v in state.extra.items() if k.startswith("assign/")}, exp

    runs = []
    rsea, exp = assignments()
    for x in rsea.values():
        assert (x.sum(1) == 2).all() and 2 <= x.sum(0).min() and x.sum(0).max() <= 3
    static, _ = assignments("algorithm.options.static_arch=true")
    first = {m: exp.algorithm._random_assignment(0, m) for m in exp.algorithm.modules}
    assert all(torch.equal(static[k], first[k[len("assign/"):]]) for k in static)  # round 1's, kept
    random, _ = assignments("algorithm.options.random_dispatch=true")
    assert any(not torch.equal(random[k], rsea[k]) for k in rsea)
    with pytest.raises(FedtuneError, match="do not split evenly"):
        assignments("algorithm.options.homo_arch=true")  # 4 experts × 2 choices over 3 clients
    homo, _ = assignments("mole.num_experts=3", "algorithm.options.homo_arch=true")
    assert all((x.sum(0) == 2).all() for x in homo.values())


def test_routing_embeddings_are_means_over_the_auxiliary_tokens(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.algorithms import ClientContext
    from fedtune.experiment import build_experiment
    from fedtune.models.mole import mole_layers

    exp = build_experiment(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset))
    algo = exp.algorithm
    state = algo.init(exp.initial)
    payload = algo.configure(1, [0], state)[0]
    data = exp.clients[0]
    ctx = ClientContext(0, 1, exp.model, exp.initial, {}, payload=payload, examples=data.examples, aux=data.aux)
    algo.prepare(ctx, payload)
    up = algo.update(ctx)
    name, layer = next(iter(mole_layers(exp.model).items()))
    captured = []
    hook = layer.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    exp.model.eval()
    with torch.no_grad():
        batch = data.examples.collate(list(data.aux))
        exp.model(**{k: v for k, v in batch.items() if k != "labels"})
    hook.remove()
    x = captured[0][batch["attention_mask"].bool()]
    assert torch.allclose(up.tensors[f"rsea/token/{name}"], layer.token_proj(x).mean(0).detach(), atol=1e-5)
    a = layer.experts[layer.local[0]].A
    assert torch.allclose(up.tensors[f"rsea/expert/{name}"][0], (x @ a.T).mean(0).detach(), atol=1e-5)

    noisy = build_experiment(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                  "algorithm.options.embedding_noise=1.0")).algorithm
    ctx.state.clear()
    algo.prepare(ctx, payload)
    assert not torch.allclose(noisy.update(ctx).tensors[f"rsea/token/{name}"], up.tensors[f"rsea/token/{name}"])


def test_infeasible_expert_settings_fail_before_training(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.run import execute

    with pytest.raises(FedtuneError, match="cannot give 3 clients at least"):
        execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "mole.num_experts=2", "algorithm.options.max_experts=2"))
    assert not (tmp_path / "amole" / "checkpoint").exists()
    with pytest.raises(FedtuneError, match="client_aux_fraction"):
        execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "partition.client_aux_fraction=0", "name=b"))


def test_fedamole_gives_identical_experts_and_assignments_on_both_runtimes(tmp_path, tiny_model_dir,
                                                                           tiny_tsv_dataset):
    from fedtune.run import execute

    cfg = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset)
    a = execute(cfg.model_copy(update={"name": "inprocess"}))
    b = execute(cfg.model_copy(update={"name": "flower"}), runtime="flower")
    for c in range(3):
        ta = load_file(str(a.run_dir / "adapters" / f"client_{c}" / "mole_model.safetensors"))
        tb = load_file(str(b.run_dir / "adapters" / f"client_{c}" / "mole_model.safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    sa = load_file(str(a.run_dir / "checkpoint" / "state.safetensors"))
    sb = load_file(str(b.run_dir / "checkpoint" / "state.safetensors"))
    assign = [k for k in sa if "assign/" in k]
    assert assign and all(torch.equal(sa[k], sb[k]) for k in assign)
    assert a.final == b.final


def test_a_saved_client_model_predicts_as_it_was_evaluated(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.run import execute
    from fedtune.saved_model import classify, load_run_model

    res = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset))
    model = load_run_model(res.run_dir, client=1)
    out = classify(model, ["a good film", "a dull story"])
    assert len(out) == 2 and all(abs(sum(o["probabilities"].values()) - 1) < 1e-5 for o in out)
    with pytest.raises(FedtuneError, match="choose one with --client"):
        load_run_model(res.run_dir)
    assert np.isfinite(res.final["client_eval/accuracy"])


def test_fedamole_instruction_tunes_a_causal_lm(tmp_path, tiny_llama_dir, tiny_alpaca_dataset):
    from fedtune.run import execute

    cfg = load_config(None, [
        f"output_dir={tmp_path}", "name=sft", f"model.name={tiny_llama_dir}", "model.task=sft",
        f"data.name={tiny_alpaca_dataset}", "partition.num_clients=3", "partition.client_test_fraction=0.25",
        "partition.client_aux_fraction=0.2", "model.finetune=mole", "mole.num_experts=4", "algorithm.name=fedamole",
        "algorithm.options.min_experts=2", "algorithm.options.max_experts=3", "federation.rounds=2",
        "train.local_steps=2", "train.batch_size=4", "threads=1",
    ])
    res = execute(cfg)
    assert np.isfinite(res.final["client_eval/perplexity"])
    assert (res.run_dir / "adapters" / "client_2" / "mole_config.json").is_file()


def test_a_stopped_fedamole_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                    monkeypatch):
    from fedtune.run import execute
    from test_resume import execute_stopped_at

    full = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=full", "federation.rounds=3")
    cut = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=cut", "federation.rounds=3")
    execute(full)
    execute_stopped_at(cut, 3, monkeypatch)
    res = execute(cut, resume=True)
    for c in range(3):
        a = load_file(str(full.run_dir / "adapters" / f"client_{c}" / "mole_model.safetensors"))
        b = load_file(str(res.run_dir / "adapters" / f"client_{c}" / "mole_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_balance_loss_of_an_instruction_batch_counts_its_shared_prompt_prefix(tmp_path, tiny_llama_dir,
                                                                                   tiny_alpaca_dataset):
    """The load-balancing loss is over every position of the batch (model/mole/layer.py:36-41 sees the whole
    bsz × seq_len of its one forward pass); a causal LM's shared template prefix is part of it."""
    from fedtune.experiment import build_experiment
    from fedtune.models.mole import balance_loss

    exp = build_experiment(load_config(None, [
        f"output_dir={tmp_path}", f"model.name={tiny_llama_dir}", "model.task=sft",
        f"data.name={tiny_alpaca_dataset}", "partition.num_clients=3", "partition.client_aux_fraction=0.2",
        "partition.client_test_fraction=0.25", "model.finetune=mole", "mole.num_experts=4", "mole.dropout=0", "algorithm.name=fedamole",
        "algorithm.options.min_experts=2", "algorithm.options.max_experts=3", "threads=1"]))
    data = exp.client(0)
    batch = data.examples.collate(list(data.train[:4]))
    exp.model.train()
    exp.forward(exp.model, batch)
    trained = float(balance_loss(exp.model))
    exp.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # one pass, every position
    assert trained == pytest.approx(float(balance_loss(exp.model)), rel=1e-5)


def test_static_arch_computes_and_uploads_no_embeddings(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """main.py:261-262 (if not args.static_arch: client.compute_embs(r)) and node.py:89-91: a kept
    architecture needs no routing embeddings, so none are measured or sent."""
    from fedtune.runtime.inprocess import InProcessPool

    sent = []

    class Watching(InProcessPool):
        def train(self, rnd, payloads, lr):
            for update in super().train(rnd, payloads, lr):  # updates arrive one at a time
                sent.append(update)
                yield update

    _run(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "algorithm.options.static_arch=true"), Watching)
    assert sent and not any(n.startswith("rsea/") for u in sent for n in u.tensors)


def test_rsea_assigns_the_optimum_for_the_uploaded_embeddings():
    """node.py:145-150: routing_probs = softmax(expert_embs @ token_embs.T / sqrt(lora_rank), dim=1), then
    optimize.py:13-25: max Σ P·X with each expert at expert_choices clients and 2 ≤ experts per client ≤ max;
    the server's X from the clients' uploads is that optimum (brute force over every binary X)."""
    import itertools

    from fedtune.algorithms import ClientUpdate, build_algorithm

    e, c, r = 4, 3, 2
    algo = build_algorithm("fedamole", {"expert_choices": 2, "min_experts": 2, "max_experts": 4}, num_clients=c)
    initial = {n: torch.zeros(r, 3) if n.endswith("A") else torch.zeros(3, r) for x in range(e)
               for n in expert_names("m", x)}
    state = algo.init(initial)
    g = torch.Generator().manual_seed(2)
    tokens, experts = torch.randn(c, r, generator=g), torch.randn(e, r, generator=g)
    updates = []
    for cid in range(c):
        held = torch.nonzero(state.extra["assign/m"][:, cid]).flatten().tolist()
        tensors = {n: initial[n] for x in held for n in expert_names("m", x)}
        tensors.update({"rsea/token/m": tokens[cid], "rsea/expert/m": experts[held], "rsea/ids/m": torch.tensor(held)})
        updates.append(ClientUpdate(cid, tensors, 10 * (cid + 1)))
    new = algo.aggregate(1, updates, state)
    P = torch.softmax(experts.double() @ tokens.double().T / math.sqrt(r), dim=1).numpy()
    best = max(float((P * np.array(x).reshape(e, c)).sum()) for x in itertools.product((0, 1), repeat=e * c)
               if (np.array(x).reshape(e, c).sum(1) == 2).all() and (2 <= np.array(x).reshape(e, c).sum(0)).all()
               and (np.array(x).reshape(e, c).sum(0) <= 4).all())
    assert float((P * new.extra["assign/m"].numpy()).sum()) == pytest.approx(best)


def test_an_expert_is_the_plain_mean_of_its_holders_whatever_their_data():
    """node.py:103-115: experts with the same id are summed and divided by their number, not weighted."""
    from fedtune.algorithms import ClientUpdate, build_algorithm

    algo = build_algorithm("fedamole", {"min_experts": 1, "max_experts": 2}, num_clients=2)
    initial = {n: torch.zeros(2, 3) if n.endswith("A") else torch.zeros(3, 2) for x in range(2)
               for n in expert_names("m", x)}
    state = algo.init(initial)
    emb = {"rsea/token/m": torch.ones(2), "rsea/expert/m": torch.ones(1, 2), "rsea/ids/m": torch.tensor([0])}
    ups = [ClientUpdate(c, {n: torch.full_like(initial[n], v) for n in expert_names("m", 0)} | emb, size)
           for c, v, size in ((0, 1.0, 1), (1, 4.0, 99))]
    assert torch.all(algo.aggregate(1, ups, state).global_tensors["m.experts.0.B"] == 2.5)


def test_per_coordinate_noise_is_the_reference_codes():
    """model/mole/util.py: TempAccumulator.add_embs (:36-89) over aux batches of one row keeps the running mean and
    max_norm = ‖first row's mean‖, then max with each later row's ‖sum‖; sample_noise (:151-158) draws
    Gamma(r, rate η)·U(−1, 1) per coordinate; mean_token_embs (:99-111) adds it and scales by min(1, max/‖noisy‖).
    Drawn here from the same generator in the same order (Gamma, then uniform)."""
    from fedtune.algorithms.fedamole import largest_clean_norm, per_coordinate_noise

    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (3, 5, 2)]  # each row's token embeddings
    mean, max_norm, num = None, None, 0
    for tok in rows:  # add_embs, one batch per row
        if mean is None:
            num, mean = tok.shape[0], tok.mean(0)
            max_norm = torch.norm(mean, p=2)
        else:
            num += tok.shape[0]
            mean = mean + (tok.sum(0) - tok.shape[0] * mean) / num
            max_norm = torch.maximum(max_norm, torch.norm(tok.sum(0), p=2))
    sums, counts = torch.stack([t.sum(0) for t in rows]), torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)
    assert torch.allclose(sums.sum(0) / counts.sum(), mean)
    assert torch.allclose(largest_clean_norm(sums, counts), max_norm.reshape(1))
    eta = 0.5
    draw = np.random.default_rng(7)
    l_lst = torch.from_numpy(draw.gamma(4, 1 / eta, size=4))  # Gamma(alpha = size[-1], beta = eta)
    v_lst = torch.from_numpy(draw.uniform(-1, 1, size=4))
    noisy = mean + l_lst * v_lst
    expected = noisy * torch.clamp(max_norm / torch.norm(noisy, p=2), max=1)
    got = per_coordinate_noise(mean, largest_clean_norm(sums, counts), eta, np.random.default_rng(7))
    assert torch.allclose(got, expected)


def test_the_exponential_schedule_is_the_reference_codes_per_round_decay():
    """util.py:70-79 (ExponentialLR: lr_begin · lr_decay ** cur_round, cur_round += 1 per call) and node.py:271-274
    (one call per round, in train_experts): round r trains at lr₀ · 0.99^(r − 1)."""
    from fedtune.config import TrainConfig
    from fedtune.training import round_lr

    cfg = TrainConfig(lr=5e-5, lr_schedule="exponential")
    cur_round, expected = 0, []
    for _ in range(30):
        expected.append(5e-5 * math.pow(0.99, cur_round))
        cur_round += 1
    assert [round_lr(cfg, r, 30) for r in range(1, 31)] == pytest.approx(expected)


@pytest.mark.parametrize("options, message", [
    ({"static_arch": True, "embedding_noise": 1.0}, "static_arch measures and uploads no embeddings; remove "
                                                    "embedding_noise"),
    ({"static_arch": True, "aux_examples": 50}, "remove aux_examples"),
    ({"random_dispatch": True, "embedding_noise": 1.0}, "random_dispatch assigns experts without the embeddings"),
    ({"embedding_noise_form": "per_coordinate"}, "set embedding_noise"),
    ({"homo_arch": True, "max_experts": 4}, "homo_arch gives every client E · expert_choices / C experts; remove max"),
])
def test_an_option_that_would_be_ignored_is_an_error(options, message):
    from fedtune.algorithms import build_algorithm

    with pytest.raises(FedtuneError, match=message):
        build_algorithm("fedamole", options, num_clients=3)
