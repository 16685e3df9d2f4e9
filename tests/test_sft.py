"""Instruction tuning of causal LMs: templates, label masking, the LM loss, choice scoring, generation,
ROUGE-L, perplexity, verbalisers, MMLU, and sft runs through the engine (tiny random Llama)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedtune.config import DataConfig, load_config
from fedtune.data.instructions import load_instruction_data
from fedtune.data.sources import data_roots
from fedtune.data.templates import Template
from fedtune.errors import FedtuneError
from fedtune.evaluation import choice_losses, choice_metrics, generate_greedy, response_nll, rouge_l
from fedtune.models.packed import packed_linears, packing_available
from fedtune.training import IGNORE, causal_lm_forward, encode_instructions


def _have(name: str) -> bool:
    return any((root / name).is_dir() for root in data_roots())


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, tok


def _rows(instructions, inputs, outputs, choices=None, answers=None):
    n = len(instructions)
    return {"instruction": instructions, "input": inputs, "output": outputs,
            "choices": choices or [[] for _ in range(n)], "answer": answers or [-1] * n, "task": ["t"] * n}


# --------------------------------------------------------------------------- templates


def test_alpaca_and_vicuna_render_the_published_prompts():
    alpaca = Template("alpaca")
    assert alpaca.prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert alpaca.prompt("Translate.", "bonjour").endswith(
        "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n")
    assert alpaca.prompt("Translate.", "bonjour").startswith("Below is an instruction that describes a task, paired")
    vicuna = Template("vicuna")
    assert vicuna.prompt("Hi", "there").endswith("USER: Hi\n\nthere ASSISTANT:")
    assert vicuna.response_prefix == " " and alpaca.response_prefix == ""


def test_chat_template_comes_from_the_tokenizer(tiny):
    _, tok = tiny
    chat = Template("chat", tok)
    assert chat.prompt("Hi", "x") == "<user> Hi\n\nx [SEP] <assistant>"
    assert chat.prompt_has_special_tokens
    with pytest.raises(FedtuneError, match="unknown prompt template 'foo'"):
        Template("foo")
    with pytest.raises(FedtuneError, match="chat template"):
        Template("chat", SimpleNamespace(chat_template=None))


def test_chat_system_prompt_replaces_the_templates_default(tiny, tmp_path):
    _, tok = tiny
    assert Template("chat", tok, "Be brief.").prompt("Hi") == "<system> Be brief. [SEP] <user> Hi [SEP] <assistant>"
    assert Template("chat", tok, "").prompt("Hi") == "<system>  [SEP] <user> Hi [SEP] <assistant>"
    path = tmp_path / "c.yaml"
    path.write_text("sft: {template: alpaca, system_prompt: Be brief.}\n")
    with pytest.raises(FedtuneError, match="sft.system_prompt applies to sft.template=chat"):
        load_config(path)


# --------------------------------------------------------------------------- encoding and masking


def test_prompt_tokens_are_masked_response_and_eos_are_targets_padding_is_never_counted(tiny):
    _, tok = tiny
    data = encode_instructions(tok, Template("alpaca"), _rows(["Say yes.", "Name a colour of the sky."],
                                                              ["", "on a clear day"], ["yes", "blue it is"]), 128)
    for ids, labels, start, ref in zip(data.features["input_ids"], data.labels, data.starts, ["yes", "blue it is"]):
        response = tok(ref, add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert ids[start:] == response
        assert labels[:start] == [IGNORE] * start
        assert labels[start:] == response
    batch = data.collate([0, 1])
    short = int(np.argmin(data.lengths))
    pad = batch["attention_mask"][short] == 0
    assert pad.any() and (batch["labels"][short][pad] == IGNORE).all()
    assert (batch["input_ids"][short][pad] == tok.pad_token_id).all()

    everything = encode_instructions(tok, Template("alpaca"), _rows(["Say yes."], [""], ["yes"]), 128,
                                     train_on_inputs=True)
    assert everything.labels[0] == everything.features["input_ids"][0]


def test_candidate_answers_are_scored_without_eos(tiny):
    _, tok = tiny
    data = encode_instructions(tok, Template("vicuna"), _rows(["Is it?"], [""], ["yes"], [["yes", "no"]], [0]), 128)
    assert data.choices[0] == [tok(" yes", add_special_tokens=False).input_ids, tok(" no", add_special_tokens=False).input_ids]
    assert data.features["input_ids"][0][data.starts[0]:] == data.choices[0][0] + [tok.eos_token_id]


def test_long_examples_keep_their_response_and_lose_the_start_of_the_prompt(tiny):
    _, tok = tiny
    long_input = " ".join(["word"] * 300)
    data = encode_instructions(tok, Template("alpaca"), _rows(["Summarise."], [long_input], ["short answer"]), 64)
    ids = data.features["input_ids"][0]
    assert len(ids) == 64
    assert ids[data.starts[0]:] == tok("short answer", add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_lm_loss_on_scored_positions_equals_the_models_own_loss(tiny):
    model, tok = tiny
    data = encode_instructions(tok, Template("alpaca"), _rows(["a b c", "d"], ["e f", ""], ["g h", "i j k l"]), 128)
    batch = data.collate([0, 1])
    prompts = [data.features["input_ids"][i][: data.starts[i]] for i in (0, 1)]
    assert prompts[0][:5] == prompts[1][:5]  # the shared preamble runs once: loss and gradients are unchanged
    weight = model.model.layers[0].self_attn.q_proj.weight
    ours = causal_lm_forward(model, batch).loss
    (ours_grad,) = torch.autograd.grad(ours, weight)
    theirs = model(**batch).loss
    (theirs_grad,) = torch.autograd.grad(theirs, weight)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-6) and theirs_grad.abs().sum() > 0


# --------------------------------------------------------------------------- choice scoring


class _BigramLM(torch.nn.Module):
    """A causal LM whose next-token distribution is a fixed bigram table: p(next | prev) = P[prev, next]."""

    base_model_prefix = "model"

    def __init__(self, table: torch.Tensor):
        super().__init__()
        v = table.shape[0]
        self.model = lambda input_ids, attention_mask, **_: SimpleNamespace(
            last_hidden_state=torch.nn.functional.one_hot(input_ids, v).float())
        self.head = torch.nn.Linear(v, v, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(table.log().T)

    def get_output_embeddings(self):
        return self.head


def test_choice_scoring_picks_the_candidate_with_the_lowest_mean_token_loss():
    p = torch.full((6, 6), 0.02)
    p[1, 2], p[2, 3], p[1, 4], p[4, 5] = 0.9, 0.9, 0.05, 0.05  # after 1: 2 then 3 is likely; 4 then 5 is not
    p = p / p.sum(1, keepdim=True)
    lm = _BigramLM(p)
    prompts = [[0, 1], [3, 0, 1]]
    choices = [[[2, 3], [4, 5]], [[4, 5], [2, 3], [2, 5]]]
    losses = choice_losses(lm, prompts, choices, pad_id=0, batch_size=2)
    expected0 = [-(math.log(p[1, 2]) + math.log(p[2, 3])) / 2, -(math.log(p[1, 4]) + math.log(p[4, 5])) / 2]
    assert np.allclose(losses[0], expected0)
    assert [int(np.argmin(x)) for x in losses] == [0, 1]
    m = choice_metrics(losses, [0, 1], ["a", "b"])
    assert m["accuracy"] == 1.0 and m["accuracy_a"] == 1.0 and "mcc" not in m  # candidate counts differ

    single = choice_losses(lm, prompts, [[[2], [4]], [[4], [2]]], pad_id=0)  # one forward per prompt
    assert np.allclose(single[0], [-math.log(p[1, 2]), -math.log(p[1, 4])])


def _full_forward_losses(model, prompts, choices):
    out = []
    for p, cs in zip(prompts, choices):
        with torch.no_grad():
            logps = [torch.log_softmax(model(torch.tensor([p + c])).logits[0].double(), -1) for c in cs]
        out.append([-np.mean([float(lp[len(p) + j - 1, t]) for j, t in enumerate(c)]) for lp, c in zip(logps, cs)])
    return out


def test_choice_scoring_matches_full_forward_on_a_real_transformer(tiny):
    model, _ = tiny
    prompts, choices = [[5, 6, 7, 8], [9, 10]], [[[11, 12], [13]], [[14], [15, 16, 17]]]
    losses = choice_losses(model, prompts, choices, pad_id=0, batch_size=4)
    for got, want in zip(losses, _full_forward_losses(model, prompts, choices)):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("multi_token", [False, True])
def test_a_shared_prompt_prefix_runs_once_and_scores_the_same(tiny, multi_token):
    """Prompts of a group share their common prefix's key/value cache; the losses are unchanged."""
    model, _ = tiny
    head_a, head_b = [5, 6, 7, 8, 9], [30, 31, 32]
    prompts = [head_a + [10, 11], head_a + [12], head_a + [13, 14, 15], head_b + [16], head_b + [17, 18], [19, 20]]
    choices = [[[40, 41], [42]] if multi_token else [[40], [42]] for _ in prompts]
    groups = ["a", "a", "a", "b", "b", "c"]
    want = _full_forward_losses(model, prompts, choices)
    for g in (groups, None):
        passes = []
        got = choice_losses(model, prompts, choices, pad_id=0, batch_size=2, groups=g, progress=passes.append)
        for x, w in zip(got, want):
            assert x == pytest.approx(w, abs=1e-5)
        # progress counts the sequences of each pass: prompts, or prompt + candidate pairs
        assert sum(passes) == (12 if multi_token else 6) and max(passes) <= 2


@pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN")
def test_packed_linears_compute_the_same_outputs_and_give_the_layers_back(tiny):
    """Scoring runs the linear layers on packed weights: same hidden states, and only inside the block."""
    model, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        want = model(ids).logits
    with packed_linears(model):
        assert all("forward" in m.__dict__ for m in linears)
        with torch.no_grad():
            got = model(ids).logits
        trained = model(ids).logits  # with gradients: the layers' own forward, so backward works
        trained.sum().backward()
    assert all("forward" not in m.__dict__ for m in linears)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(trained, want, atol=1e-6)
    assert all(m.weight.grad is not None for m in linears)
    model.zero_grad(set_to_none=True)


def test_response_perplexity_counts_response_tokens_only(tiny):
    model, tok = tiny
    data = encode_instructions(tok, Template("alpaca"), _rows(["a b", "c"], ["", "d"], ["e f g", "h"]), 128)
    nll, count = response_nll(model, data.features["input_ids"], data.starts, tok.pad_token_id, batch_size=2)
    assert count == sum(len(x) - s for x, s in zip(data.features["input_ids"], data.starts))
    with torch.no_grad():
        hf = model(**data.collate([0, 1])).loss.item()
    assert nll / count == pytest.approx(hf, rel=1e-5)


# --------------------------------------------------------------------------- generation and ROUGE-L


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [tok(t).input_ids for t in ["the film", "a very long and quite dull story about a plot", "good"]]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=8, batch_size=3)
    alone = [generate_greedy(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert any(batched)


def test_generation_on_packed_weights_equals_the_models_own_greedy_decoding(tiny):
    model, tok = tiny
    prompts = [tok(t).input_ids for t in ["the film", "a very long and quite dull story about a plot", "good"]]
    ours = generate_greedy(model, tok, prompts, max_new_tokens=8, batch_size=2)
    for p, text in zip(prompts, ours):
        out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        assert text == tok.decode(out, skip_special_tokens=True).strip()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_rouge_l_against_hand_computed_values():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat: 5 of 6 words each way
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4 → F1 = 2/3; and a wholly wrong prediction scores 0
    assert rouge_l(["quick fox", "zzz"], ["the quick brown fox", "abc"]) == pytest.approx((2 / 3 + 0) / 2)
    # Chinese is scored per character: LCS(我爱北京, 我爱上海) = 我爱 → 2/4
    assert rouge_l(["我爱北京"], ["我爱上海"]) == pytest.approx(0.5)


# --------------------------------------------------------------------------- datasets as instructions


@pytest.mark.skipif(not _have("snli"), reason="SNLI not found: set FEDTUNE_DATA or provide ../shared/data")
def test_snli_is_verbalised_with_the_issue_prompt_and_yes_maybe_no():
    task = load_instruction_data(DataConfig(name="snli", max_train_examples=30, max_eval_examples=10), 0)
    row = task.train[0]
    assert row["instruction"].startswith('Suppose "') and row["instruction"].endswith('"? Yes, No, or Maybe?')
    assert row["choices"] == ["Yes", "Maybe", "No"]
    assert row["output"] == ["Yes", "Maybe", "No"][row["label"]] and row["answer"] == row["label"]
    assert task.label_column == "label" and len(task.eval) == 10


@pytest.mark.skipif(not (_have("sst2") and _have("instruct")), reason="data not found")
def test_multitask_mixes_datasets_with_a_task_column():
    task = load_instruction_data(DataConfig(name="multitask", tasks=["sst2", "alpaca_en"], max_train_examples=20), 0)
    assert sorted(set(task.train["task"])) == ["alpaca_en", "sst2"] and len(task.train) == 40
    assert set(task.eval["task"]) == {"sst2", "alpaca_en"}  # alpaca, one file, gets a held-out slice
    assert [o.get("split", "held out") for o in task.eval_origin] == ["dev", "held out"]
    with pytest.raises(FedtuneError, match="data.tasks"):
        load_instruction_data(DataConfig(name="multitask"), 0)


def test_a_users_classification_file_gets_a_generic_verbaliser(tiny_tsv_dataset):
    task = load_instruction_data(DataConfig(name=str(tiny_tsv_dataset), text_column="sentence",
                                            label_column="label"), 0)
    row = task.train[0]
    assert row["instruction"] == "Classify the text as one of: 0, 1." and row["choices"] == ["0", "1"]


# --------------------------------------------------------------------------- through the engine


def _sft_config(tmp_path, model_dir, data, *extra):
    return load_config(None, [
        f"output_dir={tmp_path}", "name=sft", f"model.name={model_dir}", "model.task=sft", "model.max_length=96",
        f"data.name={data}", "partition.num_clients=3", "federation.rounds=2", "train.local_steps=2",
        "train.batch_size=4", "train.lr=5e-3", "eval.batch_size=8", *extra,
    ])


def test_fedit_sft_run_on_a_verbalised_classification_file(tmp_path, tiny_llama_dir, tiny_tsv_dataset):
    from fedtune.run import execute

    cfg = _sft_config(tmp_path, tiny_llama_dir, tiny_tsv_dataset, "data.text_column=sentence",
                      "data.label_column=label", "partition.method=dirichlet", "partition.min_client_size=5",
                      "eval.metrics=[choice, perplexity, rouge]", "eval.max_new_tokens=4")
    res = execute(cfg)
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("eval/accuracy", "eval/mcc", "eval/perplexity", "eval/rougeL"):
        assert key in rows[0] and key in rows[-1]
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]
    assert rows[-1]["bytes_up"] > 0 and (res.run_dir / "adapter" / "adapter_config.json").is_file()


def test_local_only_sft_on_alpaca_json_evaluates_each_client(tmp_path, tiny_llama_dir, tiny_alpaca_dataset):
    from fedtune.run import execute

    cfg = _sft_config(tmp_path, tiny_llama_dir, tiny_alpaca_dataset, "algorithm.name=local",
                      "partition.client_test_fraction=0.25", "sft.template=chat")
    res = execute(cfg)
    last = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["client_eval/perplexity"]) and "client_eval/accuracy" not in last


def test_sft_config_errors_are_one_line(tmp_path, tiny_llama_dir, tiny_alpaca_dataset):
    from fedtune.experiment import build_experiment

    with pytest.raises(FedtuneError, match="instruction dataset; model.task=classification needs"):
        build_experiment(_sft_config(tmp_path, tiny_llama_dir, tiny_alpaca_dataset, "model.task=classification"))
    with pytest.raises(FedtuneError, match="partition.by='label' is not a column"):
        build_experiment(_sft_config(tmp_path, tiny_llama_dir, tiny_alpaca_dataset, "partition.method=dirichlet"))


# --------------------------------------------------------------------------- MMLU


def test_mmlu_prompt_categories_and_subset():
    from fedtune.mmlu import CATEGORIES, prompt, question_indices, subset_indices

    assert len(CATEGORIES) == 57 and set(CATEGORIES.values()) == {"STEM", "humanities", "social sciences", "other"}
    row = {"question": "2+2?", "A": "3", "B": "4", "C": "5", "D": "6", "label": 1}
    assert prompt("high_school_mathematics", row, [row]) == (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    subjects = ["a"] * 25 + ["b"] * 7
    idx = subset_indices(subjects, 0.1, seed=3)
    assert sum(subjects[i] == "a" for i in idx) == 3 and sum(subjects[i] == "b" for i in idx) == 1
    assert (idx == subset_indices(subjects, 0.1, seed=3)).all()
    # a subject's subset questions do not depend on which other subjects are asked
    subjects = ["a"] * 25 + ["b"] * 7 + ["c"] * 40
    full = question_indices(subjects, True, None, seed=3)
    assert (full == subset_indices(subjects, 0.1, seed=3)).all()
    for only in (["b"], ["c"], ["a", "c"]):
        assert (question_indices(subjects, True, only, seed=3) == [i for i in full if subjects[i] in only]).all()
    assert (question_indices(subjects, False, ["b"], seed=3) == np.arange(25, 32)).all()


@pytest.mark.skipif(not _have("mmlu"), reason="MMLU not found: set FEDTUNE_DATA or provide ../shared/data")
def test_mmlu_reports_progress_as_questions_are_scored(tiny):
    from fedtune.mmlu import evaluate_mmlu

    model, tok = tiny
    seen = []
    result = evaluate_mmlu(model, tok, subset=True, subjects=["anatomy", "virology"], batch_size=4,
                           progress=lambda done, total: seen.append((done, total)))
    assert result.questions == 14 + 17
    assert [t for _, t in seen] == [result.questions] * len(seen) and seen[-1][0] == result.questions
    assert all(a < b for (a, _), (b, _) in zip(seen, seen[1:])) and len(seen) > 2


@pytest.mark.skipif(not _have("mmlu"), reason="MMLU not found: set FEDTUNE_DATA or provide ../shared/data")
def test_eval_mmlu_command_prints_categories_and_macro(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from fedtune.cli import app

    out = tmp_path / "mmlu.json"
    res = CliRunner().invoke(app, ["eval", "mmlu", "--model", str(tiny_llama_dir), "--subset", "--shots", "1",
                                   "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "macro (over subjects)" in res.output and "STEM" in res.output
    result = json.loads(out.read_text())
    assert result["questions"] == 1435 and len(result["subjects"]) == 57
    assert 0.0 <= result["macro_accuracy"] <= 1.0
    assert result["macro_accuracy"] == pytest.approx(np.mean(list(result["subjects"].values())))
