"""FedKDLoRA: the distillation losses, the server's own data, the teacher on the server, and both runtimes."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.distillation import attention_mse, mutual_losses, reference_attention_loss
from fedtune.errors import FedtuneError


# --------------------------------------------------------------------------- the losses, by hand

S = [[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]]
T = [[1.0, 0.0, 0.0], [-1.0, 2.0, 1.0]]
Y = [0, 2]


def _softmax(z, temperature=1.0):
    e = [math.exp(v / temperature) for v in z]
    return [v / sum(e) for v in e]


def _ce(z, y):
    return -math.log(_softmax(z)[y])


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def _mean(xs):
    return sum(xs) / len(xs)


def test_standard_kd_losses_match_a_hand_computation():
    temperature, a, b = 2.0, 0.7, 0.4
    ce_s = _mean([_ce(s, y) for s, y in zip(S, Y)])
    ce_t = _mean([_ce(t, y) for t, y in zip(T, Y)])
    kl_ts = _mean([_kl(_softmax(t, temperature), _softmax(s, temperature)) for s, t in zip(S, T)])
    kl_st = _mean([_kl(_softmax(s, temperature), _softmax(t, temperature)) for s, t in zip(S, T)])
    loss_s, loss_t = mutual_losses(torch.tensor(S), torch.tensor(T), torch.tensor(Y), "standard", temperature, a, b)
    assert float(loss_s) == pytest.approx(a * ce_s + b * temperature**2 * kl_ts, rel=1e-6)
    assert float(loss_t) == pytest.approx(a * ce_t + b * temperature**2 * kl_st, rel=1e-6)


def test_adaptive_kd_losses_match_a_hand_computation():
    ce_s = _mean([_ce(s, y) for s, y in zip(S, Y)])
    ce_t = _mean([_ce(t, y) for t, y in zip(T, Y)])
    kl_ts = _mean([_kl(_softmax(t), _softmax(s)) for s, t in zip(S, T)])
    kl_st = _mean([_kl(_softmax(s), _softmax(t)) for s, t in zip(S, T)])
    loss_s, loss_t = mutual_losses(torch.tensor(S), torch.tensor(T), torch.tensor(Y), "adaptive")
    assert float(loss_s) == pytest.approx(ce_s + kl_ts / (1 + ce_s + ce_t), rel=1e-6)
    assert float(loss_t) == pytest.approx(ce_t + kl_st / (1 + ce_s + ce_t), rel=1e-6)


def _reference_distillation(s_logits, t_logits, labels, s_attentions, t_attentions):
    """LLM-Data-Privacy/Federated-Learning-for-Fine-Tuning-Large-Language-Models distillation.py:12-14, 29-56,
    transcribed: the task losses are the models' own (CrossEntropyLoss), eps = 1."""
    kl_div_loss = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    mse = torch.nn.MSELoss()
    s_task_loss = torch.nn.CrossEntropyLoss()(s_logits, labels)
    t_task_loss = torch.nn.CrossEntropyLoss()(t_logits, labels)
    s_kl_loss = kl_div_loss(t_logits.detach(), s_logits) / (s_task_loss.detach() + t_task_loss.detach() + 1)
    t_kl_loss = kl_div_loss(s_logits.detach(), t_logits) / (s_task_loss.detach() + t_task_loss.detach() + 1)
    attention_layer_ratio = len(t_attentions) // len(s_attentions)
    mse_loss = 0.0
    for s_layer in range(len(s_attentions)):
        t_layer = s_layer * attention_layer_ratio
        mse_loss += mse(s_attentions[-s_layer - 1], t_attentions[-t_layer - 1])
    mse_loss = mse_loss / (s_task_loss + t_task_loss + 1)
    total = s_task_loss + t_task_loss + mse_loss + s_kl_loss + t_kl_loss
    return total, s_kl_loss, t_kl_loss


def test_reference_kd_loss_is_the_reference_codes_with_its_attention_term():
    g = torch.Generator().manual_seed(0)
    s_att = [torch.rand(2, 3, 4, 4, generator=g, requires_grad=True) for _ in range(2)]
    t_att = [torch.rand(2, 3, 4, 4, generator=g, requires_grad=True) for _ in range(4)]  # 4 layers: ratio 2
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T, requires_grad=True)
    y = torch.tensor(Y)
    total, s_kl, t_kl = _reference_distillation(s, t, y, s_att, t_att)
    loss_s, loss_t = mutual_losses(s, t, y, "reference")
    shared = reference_attention_loss(s_att, t_att, s, t, y)
    ce_s, ce_t = torch.nn.functional.cross_entropy(s, y), torch.nn.functional.cross_entropy(t, y)
    assert float(loss_s - ce_s) == pytest.approx(float(s_kl), rel=1e-6)  # 0.764 here; softmax KL/(1+CEs): 0.089
    assert float(loss_t - ce_t) == pytest.approx(float(t_kl), rel=1e-6)
    mine = loss_s + loss_t + shared
    assert float(mine) == pytest.approx(float(total), rel=1e-6)
    want = torch.autograd.grad(total, [s, t, *s_att, *t_att], allow_unused=True)
    got = torch.autograd.grad(mine, [s, t, *s_att, *t_att], allow_unused=True)
    for a, b in zip(want, got):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_each_loss_trains_only_its_own_model():
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T, requires_grad=True)
    for form in ("standard", "adaptive", "reference"):
        loss_s, loss_t = mutual_losses(s, t, torch.tensor(Y), form, 2.0)
        gs, gt = torch.autograd.grad(loss_s, (s, t), allow_unused=True)
        assert gt is None and gs.abs().sum() > 0
        gs, gt = torch.autograd.grad(loss_t, (s, t), allow_unused=True)
        assert gs is None and gt.abs().sum() > 0


def test_attention_mse_is_the_mean_over_layers():
    a = [torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3)]
    b = [torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3)]
    assert float(attention_mse(a, b)) == pytest.approx(0.5)


@pytest.mark.parametrize("form", ["adaptive", "reference"])
def test_the_fixed_forms_refuse_temperature_and_weights(form):
    from fedtune.algorithms import build_algorithm

    with pytest.raises(FedtuneError, match=f"kd_loss={form} has no temperature"):
        build_algorithm("fedkd", {"kd_loss": form, "temperature": 3.0})


def test_a_teacher_rank_without_a_lora_teacher_is_an_error():
    from fedtune.algorithms import build_algorithm

    with pytest.raises(FedtuneError, match="set teacher_finetune: lora, or remove it"):
        build_algorithm("fedkd", {"teacher_lora_r": 4})
    assert build_algorithm("fedkd", {"teacher_lora_r": 4, "teacher_finetune": "lora"}).options.teacher_lora_r == 4


# --------------------------------------------------------------------------- the server's data

@pytest.mark.parametrize("method", ["iid", "contiguous", "dirichlet"])
def test_the_server_holds_the_first_rows_and_no_client_holds_them(tmp_path, tiny_model_dir, tiny_tsv_dataset, method):
    from fedtune.experiment import build_experiment

    cfg = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "fedit", f"partition.method={method}",
               "partition.min_client_size=1", "partition.client_test_fraction=0.2")
    exp = build_experiment(cfg)
    n = len(exp.task.train)
    assert exp.server_rows.tolist() == list(range(round(0.2 * n)))
    held = np.concatenate([np.concatenate([c.train, c.test]) for c in exp.clients.values()])
    assert not set(held.tolist()) & set(exp.server_rows.tolist())
    assert sorted(held.tolist()) == list(range(len(exp.server_rows), n))  # the clients split all the rest
    assert exp.partition["server_examples"] == len(exp.server_rows)


def test_contiguous_gives_each_client_a_block_in_file_order(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.experiment import build_experiment

    exp = build_experiment(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "fedit", "partition.method=contiguous"))
    blocks = [exp.clients[c].train.tolist() for c in range(3)]
    assert blocks == [list(range(18, 42)), list(range(42, 66)), list(range(66, 90))]


# --------------------------------------------------------------------------- runs

def _cfg(tmp_path, model, data, algo, *extra):
    return load_config(None, [
        f"output_dir={tmp_path}", f"name={algo}", f"model.name={model}", f"data.name={data}",
        "data.text_column=sentence", "data.label_column=label", "partition.num_clients=3",
        "partition.server_fraction=0.2", "lora.r=2", "lora.alpha=4", "federation.rounds=2", "train.local_steps=2",
        "train.batch_size=8", "train.lr=5e-3", f"algorithm.name={algo}", "threads=1", *extra,
    ])


def _kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, teacher, *extra):
    return _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "fedkd", f"algorithm.options.teacher={teacher}",
                "algorithm.options.teacher_pretrain_epochs=1", "algorithm.options.teacher_lr=1e-3", *extra)


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_fedkd_without_distillation_or_teacher_training_is_fedit(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                  tiny_teacher_dir):
    from fedtune.run import execute

    kd = execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir, "algorithm.options.kd_epochs=0",
                     "algorithm.options.teacher_epochs=0"))
    fedit = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "fedit"))
    a, b = _adapter(kd.run_dir), _adapter(fedit.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kd_rows, fedit_rows = _rows(kd.run_dir), _rows(fedit.run_dir)
    assert [r["eval/accuracy"] for r in kd_rows] == [r["eval/accuracy"] for r in fedit_rows]
    assert [r["bytes_up"] for r in kd_rows] == [r["bytes_up"] for r in fedit_rows]
    assert all("eval/teacher/accuracy" in r for r in kd_rows)  # the teacher is scored every evaluated round


def test_the_teacher_never_leaves_the_server_and_distillation_moves_the_student(
        tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir):
    from fedtune.experiment import build_experiment
    from fedtune.runlog import RunLog
    from fedtune.runtime.inprocess import InProcessPool
    from fedtune.runtime.server import run_rounds

    cfg = _kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir)
    exp = build_experiment(cfg)
    sent = []

    class Watching(InProcessPool):
        def train(self, rnd, payloads, lr):
            sent.extend(payloads.values())
            return super().train(rnd, payloads, lr)

    state, row = run_rounds(exp, Watching(exp), RunLog(cfg.run_dir))
    teacher = exp.algorithm.teacher
    teacher_values = [p.detach() for p in teacher.parameters()]
    student_names = set(exp.initial)
    assert sent and all(set(p.tensors) == student_names for p in sent)
    for p in sent:
        for t in p.tensors.values():
            assert not any(t.shape == v.shape and torch.equal(t, v) for v in teacher_values)
    assert state.extra and all(k.startswith("teacher/") for k in state.extra)
    assert row["agg/kd_student_loss"] > 0 and row["agg/teacher_loss"] > 0
    assert row["agg/kd_student_shift"] > 0  # distillation moved the student off the FedIT average
    assert "eval/teacher/accuracy" in row
    # in-process, the server borrowed the clients' model and gave it back as it found it
    assert all(p.grad is None for p in exp.model.parameters())


def test_attention_distillation_needs_one_layout(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir):
    from fedtune.run import execute

    with pytest.raises(FedtuneError, match="attention maps of one layout"):
        execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir,
                    "algorithm.options.attention_weight=1.0"))
    res = execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_model_dir, "name=same-layout",
                      "algorithm.options.attention_weight=1.0"))
    assert math.isfinite(_rows(res.run_dir)[-1]["agg/kd_student_loss"])
    with pytest.raises(FedtuneError, match="kd_loss: reference adds the reference code's attention term, which needs"):
        execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir, "name=ref",
                    "algorithm.options.kd_loss=reference"))
    res = execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_model_dir, "name=ref-same",
                      "algorithm.options.kd_loss=reference"))
    assert _rows(res.run_dir)[-1]["agg/kd_attention_loss"] > 0


def test_a_saved_teacher_is_reused_by_path_without_pretraining(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                tiny_teacher_dir):
    from fedtune.run import execute

    first = execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir, "name=first"))
    saved = first.run_dir / "teacher"
    assert json.loads((saved / "teacher.json").read_text())["finetune"] == "full"
    again = execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, saved, "name=again",
                        "algorithm.options.teacher_pretrain_epochs=0"))
    assert not (again.run_dir / "teacher").exists()  # nothing pre-trained, nothing saved
    a, b = _rows(first.run_dir), _rows(again.run_dir)
    assert [r["eval/teacher/accuracy"] for r in a] == [r["eval/teacher/accuracy"] for r in b]
    assert [r["eval/accuracy"] for r in a] == [r["eval/accuracy"] for r in b]


def test_a_lora_teacher_is_saved_as_an_adapter_and_reused(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                          tiny_teacher_dir):
    from fedtune.run import execute

    first = execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir, "name=lora-first",
                        "algorithm.options.teacher_finetune=lora", "algorithm.options.teacher_lora_r=2"))
    saved = first.run_dir / "teacher"
    assert (saved / "adapter_config.json").is_file()
    again = execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, saved, "name=lora-again",
                        "algorithm.options.teacher_pretrain_epochs=0"))
    assert ([r["eval/teacher/accuracy"] for r in _rows(first.run_dir)]
            == [r["eval/teacher/accuracy"] for r in _rows(again.run_dir)])
    with pytest.raises(FedtuneError, match="remove teacher_lora_r"):
        execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, saved, "name=lora-rank",
                    "algorithm.options.teacher_pretrain_epochs=0", "algorithm.options.teacher_finetune=lora",
                    "algorithm.options.teacher_lora_r=4"))


def test_fedkd_needs_server_data(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir):
    from fedtune.run import execute

    with pytest.raises(FedtuneError, match="set partition.server_fraction"):
        execute(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir, "partition.server_fraction=0"))


def test_fedkd_gives_identical_students_on_both_runtimes(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                         tiny_teacher_dir):
    from fedtune.run import execute

    cfg = _kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir)
    inproc = execute(cfg.model_copy(update={"name": "inprocess"}))
    flower = execute(cfg.model_copy(update={"name": "flower"}), runtime="flower")
    a, b = _adapter(inproc.run_dir), _adapter(flower.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _rows(inproc.run_dir), _rows(flower.run_dir)
    assert [r["eval/teacher/accuracy"] for r in ra] == [r["eval/teacher/accuracy"] for r in rb]
    assert [r["bytes_down"] for r in ra] == [r["bytes_down"] for r in rb]


def test_a_stopped_fedkd_run_resumes_with_its_teacher(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir,
                                                      monkeypatch):
    """The teacher trains every round and lives in the checkpoint: a resumed run ends like an uninterrupted one."""
    from fedtune.run import execute
    from test_resume import execute_stopped_at

    full = _kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir, "name=full", "federation.rounds=3")
    cut = _kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir, "name=cut", "federation.rounds=3")
    execute(full)
    execute_stopped_at(cut, 3, monkeypatch)
    execute(cut, resume=True)
    a, b = _adapter(full.run_dir), _adapter(cut.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(full.run_dir)[-1]["eval/teacher/accuracy"] == _rows(cut.run_dir)[-1]["eval/teacher/accuracy"]


def test_server_training_leaves_the_shared_client_model_as_it_found_it(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                       tiny_teacher_dir):
    from fedtune.algorithms import ClientUpdate
    from fedtune.models.lora import trainable_state

    from fedtune.experiment import build_experiment

    exp = build_experiment(_kd(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_teacher_dir))
    algo = exp.algorithm
    algo.setup_server(exp.server_context())
    state = algo.init(exp.initial)
    before = trainable_state(exp.model)
    exp.model.eval()
    updates = [ClientUpdate(c, {k: v + 0.01 * c for k, v in exp.initial.items()}, 10) for c in range(3)]
    new = algo.aggregate(1, updates, state)
    after = trainable_state(exp.model)
    assert all(torch.equal(before[k], after[k]) for k in before) and not exp.model.training
    assert any(not torch.equal(new.global_tensors[k], state.global_tensors[k]) for k in before)
